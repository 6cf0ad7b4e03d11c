"""GPU: forward and gradients against the fp64 reference, error at most twice PyTorch's own in
the same dtype; masking edge cases; large inputs; deterministic mode; packed and strided inputs."""
import itertools

import pytest
import torch

from conftest import GPU_EACH_FAMILY, assert_close_to_ref, is_hopper, max_err, poison_allocator
from flash_attn_t import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flash_attn_t.reference import attention_reference

pytestmark = GPU_EACH_FAMILY

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
GQA = [(4, 4), (4, 2), (8, 1)]  # (nheads, nheads_k): MHA, GQA, MQA
# (seqlen_q, seqlen_k): odd lengths and non-multiples of the tiles, sq != sk both ways: every config
FULL_GRID_SEQLENS = [(17, 17), (113, 203), (203, 113)]
# single rows / columns, exact tiles, long: each with both causal values and 2 of the 12
# (dtype, head dim, GQA) configs, picked with a stride coprime to 12 so that each config appears
# twice, spread over the sizes
DIAGONAL_SEQLENS = [(1, 1), (128, 128), (1, 333), (333, 1), (256, 512), (1000, 1000)]


def grid():
    configs = list(itertools.product(DTYPES, HEAD_DIMS, GQA))
    cases = list(itertools.product(FULL_GRID_SEQLENS, [False, True], configs))
    diagonal = itertools.product(DIAGONAL_SEQLENS, [False, True], range(2))
    cases += [(seqlens, causal, configs[5 * i % len(configs)]) for i, (seqlens, causal, _) in enumerate(diagonal)]
    return [pytest.param(sq, sk, causal, dtype, d, h, hk, id=f"{sq}x{sk}-{'causal' if causal else 'full'}-"
                         f"{str(dtype)[6:]}-d{d}-h{h}k{hk}")
            for (sq, sk), causal, (dtype, d, (h, hk)) in cases]

def make_inputs(batch, sq, sk, heads, heads_k, head_dim, dtype, scale=1.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape_q, shape_k = (batch, sq, heads, head_dim), (batch, sk, heads_k, head_dim)
    q = torch.randn(shape_q, device="cuda", dtype=dtype, generator=gen) * scale
    k = torch.randn(shape_k, device="cuda", dtype=dtype, generator=gen) * scale
    v = torch.randn(shape_k, device="cuda", dtype=dtype, generator=gen)
    dout = torch.randn(shape_q, device="cuda", dtype=dtype, generator=gen)
    return q, k, v, dout


def reference_and_pytorch(q, k, v, dout, causal, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                          alibi_slopes=None):
    """fp64 reference (out, lse, grads) and PyTorch's math in q's dtype (out, grads)."""
    results = []
    for compute_dtype in (torch.float64, q.dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention_reference(*leaves, softmax_scale=softmax_scale, causal=causal,
                                       compute_dtype=compute_dtype, window_size=window_size, softcap=softcap,
                                       alibi_slopes=alibi_slopes)
        grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
        results.append((out, lse, grads))
    return results


def run_ours(q, k, v, dout, causal, deterministic=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    poison_allocator()
    out, lse, _ = flash_attn_func(*leaves, softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                  window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                  return_attn_probs=True)
    poison_allocator()
    grads = torch.autograd.grad(out, leaves, dout)
    return out, lse, grads


def check_against_reference(q, k, v, dout, causal, **kwargs):
    out, lse, grads = run_ours(q, k, v, dout, causal, **kwargs)
    (ref_out, ref_lse, ref_grads), (pt_out, _, pt_grads) = reference_and_pytorch(
        q, k, v, dout, causal, kwargs.get("softmax_scale"), kwargs.get("window_size", (-1, -1)),
        kwargs.get("softcap", 0.0), kwargs.get("alibi_slopes"))
    assert_close_to_ref(out, ref_out, pt_out, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "lse must be +inf exactly on rows that see no key"
    if finite.any():
        assert max_err(lse[finite], ref_lse[finite]) < 1e-3 * (1 + ref_lse[finite].abs().max().item()), "lse"
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("sq,sk,causal,dtype,head_dim,heads,heads_k", grid())
def test_forward_backward_against_fp64(sq, sk, causal, dtype, head_dim, heads, heads_k):
    q, k, v, dout = make_inputs(2, sq, sk, heads, heads_k, head_dim, dtype, seed=sq * 7 + sk)
    check_against_reference(q, k, v, dout, causal)


@pytest.mark.parametrize("window", [(0, 0), (5, 3), (64, 0), (100, -1), (-1, 37), (127, 129), (0, -1), (-1, 0)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(200, 200), (97, 300), (300, 97), (1, 513)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16)])
def test_sliding_window_against_fp64(window, causal, sq, sk, head_dim, dtype):
    """window_size=(left, right) with flash_attn's semantics (bottom-right aligned, -1 unbounded,
    right = 0 under causal): windows inside one key block, across blocks, wider than the keys,
    one-sided; GQA; ragged lengths, sq != sk, and rows that see no key."""
    q, k, v, dout = make_inputs(2, sq, sk, 8, 2, head_dim, dtype, seed=sq + sk + window[0])
    check_against_reference(q, k, v, dout, causal, window_size=window)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 7)), (True, (100, -1)),
                                           (False, (-1, 0))])
@pytest.mark.parametrize("sq,sk", [(200, 200), (97, 300), (300, 97), (1, 513)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16)])
def test_alibi_against_fp64(per_batch, causal, window, sq, sk, head_dim, dtype):
    """alibi_slopes (nheads,) or (batch, nheads), flash_attn's bias: -slope |i + sk - sq - j|, and
    slope j where the kernel runs causal (causal, or a (-1, 0) window; lse as flash_attn returns
    it); with windows, GQA, sq != sk, one query row. PyTorch's own bf16/fp16 math adds the bias in
    that dtype (large errors at these distances), so the error is also held to an absolute bound
    that a wrong bias could not meet."""
    q, k, v, dout = make_inputs(2, sq, sk, 8, 2, head_dim, dtype, seed=sq + sk + window[0])
    slopes = 2.0 ** -torch.arange(1, 9, device="cuda", dtype=torch.float32)  # the ALiBi paper's, 8 heads
    if per_batch:
        slopes = torch.stack([slopes, slopes.flip(0) / 2])
    check_against_reference(q, k, v, dout, causal, window_size=window, alibi_slopes=slopes)
    out, _, grads = run_ours(q, k, v, dout, causal, window_size=window, alibi_slopes=slopes)
    (ref_out, _, ref_grads), _ = reference_and_pytorch(q, k, v, dout, causal, None, window, 0.0, slopes)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        err = (x.double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 1e-2, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 7))])
@pytest.mark.parametrize("sq,sk", [(200, 200), (97, 300), (300, 97)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16)])
def test_softcap_with_alibi_against_fp64(causal, window, sq, sk, head_dim, dtype):
    """softcap and ALiBi together (the sm80 kernels' Combined variant, on Hopper too): the capped
    score gets the bias, as in flash_attn; GQA, sq != sk, windows."""
    q, k, v, dout = make_inputs(2, sq, sk, 8, 2, head_dim, dtype, seed=sq + 3 * sk)
    slopes = torch.rand(8, device="cuda")
    check_against_reference(q, k, v, dout, causal, window_size=window, softcap=20.0, alibi_slopes=slopes)


@pytest.mark.parametrize("softcap", [5.0, 50.0])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 7)), (True, (100, -1))])
@pytest.mark.parametrize("sq,sk", [(200, 200), (97, 300), (300, 97), (1, 513)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16)])
def test_softcap_against_fp64(softcap, causal, window, sq, sk, head_dim, dtype):
    """softcap: scores x -> softcap * tanh(x / softcap) (Gemma 2), forward and backward, alone and
    with causal / window, GQA, sq != sk, one query row (split-KV); a softcap of 5 bends most scores
    (the derivative far from 1), 50 few. The inputs are scaled up so the scores reach the cap."""
    q, k, v, dout = make_inputs(2, sq, sk, 8, 2, head_dim, dtype, seed=sq + sk + int(softcap))
    q = (q * 3).to(dtype)
    check_against_reference(q, k, v, dout, causal, window_size=window, softcap=softcap)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 7))])
@pytest.mark.parametrize("sq,sk", [(200, 200), (300, 97), (1, 513)])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16)])
def test_learnable_sink_against_fp64(causal, window, sq, sk, head_dim, dtype):
    """learnable_sink (gpt-oss's attention sinks): out, lse, dq, dk, dv and the sink's gradient
    against the fp64 reference, within twice PyTorch's error in the same dtype; with causal /
    window, GQA, sq != sk (rows without keys), one query row (split-KV)."""
    q, k, v, dout = make_inputs(2, sq, sk, 8, 2, head_dim, dtype, seed=sq + sk + 5)
    sink = torch.linspace(-2.0, 3.0, 8, device="cuda")
    variant = dict(causal=causal, window_size=window)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sink)]
    poison_allocator()
    out, lse, _ = flash_attn_func(*leaves[:3], learnable_sink=leaves[3], return_attn_probs=True, **variant)
    grads = torch.autograd.grad(out, leaves, dout)
    results = []
    for compute_dtype in (torch.float64, dtype):
        ref_leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v, sink)]
        ref_out, ref_lse = attention_reference(*ref_leaves[:3], sinks=ref_leaves[3], compute_dtype=compute_dtype,
                                               **variant)
        results.append((ref_out, ref_lse, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute_dtype))))
    (ref_out, ref_lse, ref_grads), (pt_out, _, pt_grads) = results
    assert_close_to_ref(out, ref_out, pt_out, "out")
    assert torch.isfinite(lse).all(), "with a sink every row has a finite lse"
    assert max_err(lse, ref_lse) < 1e-3 * (1 + ref_lse.abs().max().item()), "lse"
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_deterministic_is_bitwise_repeatable(causal):
    q, k, v, dout = make_inputs(2, 700, 700, 4, 4, 128, torch.bfloat16, seed=11)
    first, second = (run_ours(q, k, v, dout, causal, deterministic=True, window_size=(150, 20)) for _ in range(2))
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("head_dim", [1, 8, 32, 59, 80, 96, 111, 120, 160, 192, 224, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_run_zero_padded(head_dim, causal):
    # no kernel for most of these: q, k, v are zero-padded to 64 / 128 / 256 and the output sliced
    # back; 256 has its own kernels (on Hopper sm90 ones in both passes)
    q, k, v, dout = make_inputs(2, 150, 170, 4, 2, head_dim, torch.bfloat16, seed=head_dim)
    check_against_reference(q, k, v, dout, causal)
    out = flash_attn_func(q, k, v, causal=causal)
    assert out.shape == q.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_large_inputs_stay_finite_and_accurate(dtype, head_dim):
    # scores of magnitude ~64 * sqrt(d): the online max and the exp2 shift must keep it exact
    q, k, v, dout = make_inputs(2, 300, 300, 4, 2, head_dim, dtype, scale=8.0, seed=5)
    for causal in (False, True):
        check_against_reference(q, k, v, dout, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_hd256_with_more_tiles_than_sms(causal):
    # A persistent kernel (the sm90 forward; the hd256 backward's) takes a second tile on a CTA
    # only when there are more tiles than SMs: 1536 tokens, 8 q / 4 kv heads make 96 tiles per
    # sequence in each hd256 grid (12 query blocks of 128 per q head, 24 key blocks of 64 per kv
    # head), and the batch makes at least two per SM.
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    q, k, v, dout = make_inputs(-(-2 * sms // 96), 1536, 1536, 8, 4, 256, torch.bfloat16, seed=11)
    check_against_reference(q, k, v, dout, causal)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_custom_softmax_scale(head_dim):
    q, k, v, dout = make_inputs(1, 150, 190, 2, 1, head_dim, torch.bfloat16, seed=9)
    check_against_reference(q, k, v, dout, True, softmax_scale=0.3)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_fully_masked_rows_give_zeros_and_zero_grads(head_dim):
    # causal with seqlen_q > seqlen_k: the first 90 query rows see no key
    q, k, v, dout = make_inputs(2, 120, 30, 4, 2, head_dim, torch.bfloat16, seed=3)
    out, lse, (dq, dk, dv) = run_ours(q, k, v, dout, causal=True)
    assert torch.equal(out[:, :90], torch.zeros_like(out[:, :90]))
    assert torch.isinf(lse[:, :, :90]).all() and (lse[:, :, :90] > 0).all()
    assert torch.equal(dq[:, :90], torch.zeros_like(dq[:, :90]))
    for t in (out, lse[:, :, 90:], dq, dk, dv):
        assert not torch.isnan(t).any()


@pytest.mark.parametrize("causal", [False, True])
def test_seqlen_k_zero(causal):
    q, k, v, dout = make_inputs(2, 37, 0, 4, 2, 64, torch.float16)
    out, lse, (dq, dk, dv) = run_ours(q, k, v, dout, causal=causal)
    assert torch.equal(out, torch.zeros_like(out)) and lse.shape == (2, 4, 37)
    assert torch.isinf(lse).all() and (lse > 0).all()
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("batch,sq,sk", [(0, 16, 16), (2, 0, 16), (0, 0, 0)])
def test_empty_inputs(batch, sq, sk):
    q, k, v, dout = make_inputs(batch, sq, sk, 4, 2, 64, torch.bfloat16)
    out, lse, (dq, dk, dv) = run_ours(q, k, v, dout, causal=True)
    assert out.shape == q.shape and out.device == q.device and lse.shape == (batch, 4, sq)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_deterministic_gradients_are_bitwise_repeatable(causal, head_dim):
    q, k, v, dout = make_inputs(2, 700, 900, 8, 2, head_dim, torch.bfloat16, seed=11)
    first = run_ours(q, k, v, dout, causal, deterministic=True)[2]
    for _ in range(2):
        again = run_ours(q, k, v, dout, causal, deterministic=True)[2]
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    check_against_reference(q, k, v, dout, causal, deterministic=True)


@pytest.mark.parametrize("heads_k", [4, 2])
def test_packed_qkv_and_kv_match_unpacked(heads_k):
    # deterministic: the gradients compare bitwise, free of atomic-order noise
    q, k, v, dout = make_inputs(2, 130, 130, 4, heads_k, 64, torch.float16, seed=4)
    ref_out, _, ref_grads = run_ours(q, k, v, dout, causal=True, deterministic=True)
    kv = torch.stack([k, v], dim=2).requires_grad_()
    out = flash_attn_kvpacked_func(q, kv, causal=True, deterministic=True)
    (dkv,) = torch.autograd.grad(out, kv, dout)
    assert torch.equal(out, ref_out)
    assert torch.equal(dkv, torch.stack(ref_grads[1:], dim=2))
    if heads_k == q.shape[2]:
        qkv = torch.stack([q, k, v], dim=2).requires_grad_()
        out = flash_attn_qkvpacked_func(qkv, causal=True, deterministic=True)
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
        assert torch.equal(out, ref_out)
        assert torch.equal(dqkv, torch.stack(ref_grads, dim=2))


def test_forwards_on_several_streams_at_once_match_one_stream():
    """The sm90 forward hands out tiles through a counter per stream that each launch leaves at
    zero: launches queued on four streams at once (more tiles than SMs, so the counter is used)
    and repeated on each give what the same calls give one after another on one stream."""
    problems = [make_inputs(2, 2048 + 256 * i, 2048, 8, 2, 64 * (1 + i % 2), torch.bfloat16, seed=20 + i)
                for i in range(4)]
    expected = [flash_attn_func(q, k, v, causal=bool(i % 2)) for i, (q, k, v, _) in enumerate(problems)]
    streams = [torch.cuda.Stream() for _ in problems]
    torch.cuda.synchronize()
    outs = [[] for _ in problems]
    for _ in range(3):
        for i, ((q, k, v, _), stream) in enumerate(zip(problems, streams)):
            with torch.cuda.stream(stream):
                outs[i].append(flash_attn_func(q, k, v, causal=bool(i % 2)))
    torch.cuda.synchronize()
    for want, got in zip(expected, outs):
        for out in got:
            assert torch.equal(out, want)


def test_strided_inputs():
    # q, k, v as views with non-contiguous batch/seq/head strides: (b, h, s, d) transposed
    base = torch.randn(3, 2, 4, 150, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = (base[i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    check_against_reference(q, k, v, dout, causal=True)
    # slices of a packed GQA qkv projection (b, s, h + 2 hk, d), and a non-contiguous dout
    packed = torch.randn(2, 97, 8 + 2 + 2, 64, device="cuda", dtype=torch.float16)
    q, k, v = packed[:, :, :8], packed[:, :, 8:10], packed[:, :, 10:]
    dout = torch.randn(2, 8, 97, 64, device="cuda", dtype=torch.float16).transpose(1, 2)
    check_against_reference(q, k, v, dout, causal=False)
    # a view at an odd element offset (not 16-byte aligned) is copied, never misread
    flat = torch.randn(2 * 64 * 2 * 64 + 1, device="cuda", dtype=torch.float16)
    q_odd = flat[1:].view(2, 64, 2, 64)
    check_against_reference(q_odd, q_odd.clone(), q_odd.clone(), torch.randn_like(q_odd), causal=False)


def test_mixed_devices_and_cpu_are_rejected():
    q, k, v, _ = make_inputs(1, 8, 8, 2, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="k must be a CUDA tensor"):
        flash_attn_func(q, k.cpu(), v)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="v is on cuda:1 but q is on cuda:0"):
            flash_attn_func(q, k, v.to("cuda:1"))


def kernel_names(causal, head_dim=128):
    q, k, v, dout = make_inputs(2, 300, 300, 4, 2, head_dim, torch.bfloat16)
    q.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = flash_attn_func(q, k, v, causal=causal)
        out.backward(dout)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return [n for n in names if "fwd_kernel" in n], [n for n in names if "bwd_kernel" in n]


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_run_the_selected_kernel_family(kernel_family, causal, head_dim):
    # head dim 256 too has sm90 kernels in both passes (its backward for the masks alone)
    expect_sm90 = is_hopper() and kernel_family == "default"
    for pass_name, names in zip(("forward", "backward"), kernel_names(causal, head_dim)):
        assert names, f"no {pass_name} kernel seen by the profiler"
        assert all(("sm90::" in n) == expect_sm90 for n in names), names
