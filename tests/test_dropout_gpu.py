"""GPU: dropout (dropout_p > 0) against the fp64 reference with the kernels' own keep mask, through
both kernel families (on Hopper the sm90 pair, whose backward draws the same mask in its
transposed layout, and the sm80 pair).

The mask is flash_attn_t.philox.dropout_keep_mask of the call's (seed, offset): torch's CUDA
generator's seed and its offset just before the call (each dropout call advances it by 4). The
kernels' mask is also read back from the kernels themselves, independently of that formula: with
q = 0 every probability of a row is 1 / seqlen_k, and with V the identity the output row is the
row's keep mask times 1 / (seqlen_k (1 - p)).
"""
import pytest
import torch

from conftest import GPU_EACH_FAMILY, assert_close_to_ref, max_err, poison_allocator
from flash_attn_t import flash_attn_func, flash_attn_varlen_func
from flash_attn_t.philox import dropout_keep_mask
from flash_attn_t.reference import attention_reference

pytestmark = GPU_EACH_FAMILY


def next_seed_and_offset():
    """The (seed, offset) the next dropout call draws from q's (the current) device's generator."""
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    return gen.initial_seed(), gen.get_offset()


def make_inputs(batch, sq, sk, heads, heads_k, head_dim, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, sq, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(batch, sk, heads_k, head_dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    dout = torch.randn(batch, sq, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    return q, k, v, dout


def mask_probe(batch, sq, sk, heads, dtype=torch.bfloat16):
    """q = 0 and V = I (sk <= 128 keys, head dim 128): each output row is the row's keep mask
    times a positive constant (probe_keep reads it back)."""
    q = torch.zeros(batch, sq, heads, 128, device="cuda", dtype=dtype)
    k = torch.randn(batch, sk, heads, 128, device="cuda", dtype=dtype)
    v = torch.eye(sk, 128, device="cuda", dtype=dtype)[None, :, None].expand(batch, sk, heads, 128).contiguous()
    return q, k, v


def probe_keep(out, sk):
    """mask_probe's output as the keep mask (batch, heads, sq, sk)."""
    return out[..., :sk].permute(0, 2, 1, 3) > 0


def kernel_mask(dropout_p, batch, sq, sk, heads, dtype=torch.bfloat16, causal=False, **kwargs):
    """The keep mask (batch, heads, sq, sk) the kernels apply, read back through mask_probe, the
    output, and the call's (seed, offset)."""
    q, k, v = mask_probe(batch, sq, sk, heads, dtype)
    drawn = next_seed_and_offset()
    out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal, **kwargs)
    return probe_keep(out, sk), out, drawn


def test_the_kernels_keep_mask_is_the_documented_philox_mask():
    keep, out, (seed, offset) = kernel_mask(0.25, 2, 77, 100, 3)
    expected = dropout_keep_mask(seed, offset, 2, 3, 77, 100, 0.25, device="cuda")
    assert torch.equal(keep, expected)
    kept = out[..., :100].permute(0, 2, 1, 3)[expected].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (100 * 0.75)), rtol=1e-2)  # 1 / (sk p_keep)
    assert next_seed_and_offset() == (seed, offset + 4)


def test_the_op_writes_the_calls_seed_and_offset_into_rng_state():
    q, k, v, _ = make_inputs(1, 40, 40, 2, 2, 64, torch.float16, seed=1)
    rng_state = torch.full((2,), -1, dtype=torch.int64, device="cuda")
    seed, offset = next_seed_and_offset()
    torch.ops.flash_attn_t.fwd(q, k, v, 0.125, False, dropout_p=0.1, rng_state=rng_state)
    assert rng_state.tolist() == [seed, offset]


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_keep_fraction(dropout_p):
    keep, _, _ = kernel_mask(dropout_p, 4, 512, 128, 8)
    n = keep.numel()
    sigma = (dropout_p * (1 - dropout_p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 6 * sigma
    # rows and columns alike: no lane, row or key group drops more than its share
    for dim in (2, 3):
        per = keep.float().mean(dim=tuple(d for d in range(4) if d != dim))
        assert (per - (1 - dropout_p)).abs().max().item() < 6 * (dropout_p * (1 - dropout_p) * per.numel() / n) ** 0.5


def test_causal_mask_is_the_same_draw_on_the_visible_keys():
    keep, _, (seed, offset) = kernel_mask(0.3, 1, 90, 128, 2, causal=True)
    expected = dropout_keep_mask(seed, offset, 1, 2, 90, 128, 0.3, device="cuda")
    visible = torch.ones(90, 128, dtype=torch.bool, device="cuda").tril(128 - 90)
    assert torch.equal(keep & visible, expected & visible) and not keep[..., ~visible].any()


def reference_and_pytorch(q, k, v, dout, causal, dropout_p, keep, **variant):
    """fp64 reference (out, grads) and PyTorch's math in q's dtype, both with the keep mask (and
    the reference's other keywords: cu_seqlens, softcap, alibi_slopes)."""
    results = []
    for compute_dtype in (torch.float64, q.dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        out, _ = attention_reference(*leaves, causal=causal, compute_dtype=compute_dtype, dropout_p=dropout_p,
                                     dropout_keep=keep, **variant)
        results.append((out, torch.autograd.grad(out, leaves, dout.to(compute_dtype))))
    return results


def check(ours, grads, q, k, v, dout, causal, dropout_p, keep, **variant):
    (ref_out, ref_grads), (pt_out, pt_grads) = reference_and_pytorch(q, k, v, dout, causal, dropout_p, keep, **variant)
    assert_close_to_ref(ours, ref_out, pt_out, "out")
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("sq,sk", [(113, 203), (203, 113), (1, 333), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,head_dim,heads,heads_k", [(torch.bfloat16, 64, 4, 2), (torch.float16, 128, 4, 4),
                                                          (torch.bfloat16, 128, 8, 1), (torch.float16, 59, 4, 2),
                                                          (torch.bfloat16, 256, 2, 1)])
def test_forward_backward_against_fp64_with_the_mask(sq, sk, causal, dtype, head_dim, heads, heads_k):
    dropout_p = 0.17
    q, k, v, dout = make_inputs(2, sq, sk, heads, heads_k, head_dim, dtype, seed=sq + sk + head_dim)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    seed, offset = next_seed_and_offset()
    poison_allocator()
    out = flash_attn_func(*leaves, dropout_p=dropout_p, causal=causal)
    poison_allocator()
    grads = torch.autograd.grad(out, leaves, dout)
    keep = dropout_keep_mask(seed, offset, 2, heads, sq, sk, dropout_p, device="cuda")
    check(out, grads, q, k, v, dout, causal, dropout_p, keep)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_against_fp64_with_the_mask(causal):
    """Sequence i draws with bh = i x nheads + head and its own rows and keys (lengths 0 and 1 too)."""
    dropout_p, heads, heads_k = 0.2, 4, 2
    lens_q, lens_k = [70, 0, 1, 130], [90, 5, 1, 64]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(sum(lens_q), heads, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(sum(lens_k), heads_k, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    dout = torch.randn_like(q)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    seed, offset = next_seed_and_offset()
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=dropout_p, causal=causal)
    grads = torch.autograd.grad(out, leaves, dout)
    keep = dropout_keep_mask(seed, offset, len(lens_q), heads, max(lens_q), max(lens_k), dropout_p, device="cuda")
    check(out, grads, q, k, v, dout, causal, dropout_p, keep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_manual_seed_reproduces_a_run_and_calls_draw_anew():
    q, k, v, _ = make_inputs(2, 150, 150, 4, 4, 128, torch.bfloat16, seed=5)
    torch.manual_seed(123)
    first, second = (flash_attn_func(q, k, v, dropout_p=0.3) for _ in range(2))
    torch.manual_seed(123)
    again = flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(first, again)
    assert max_err(first, second) > 1e-2


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v, dout = make_inputs(2, 300, 300, 4, 2, 64, torch.float16, seed=6)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, dropout_p=0.2, causal=True, deterministic=True)
    first, second = (torch.autograd.grad(out, leaves, dout, retain_graph=True) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dropout_zero_is_the_plain_kernel():
    q, k, v, _ = make_inputs(1, 100, 100, 2, 2, 64, torch.bfloat16, seed=7)
    offset = next_seed_and_offset()[1]
    assert torch.equal(flash_attn_func(q, k, v, dropout_p=0.0), flash_attn_func(q, k, v))
    assert next_seed_and_offset()[1] == offset  # no draw without dropout


def test_cuda_graph_replays_draw_new_masks():
    """Captured once, each replay reads the generator's new offset: a different mask each time,
    and each the documented mask of the (seed, offset) the replay wrote into rng_state."""
    batch, sq, sk, heads, p = 2, 64, 96, 2, 0.4
    q, k, v = mask_probe(batch, sq, sk, heads)
    rng_state = torch.zeros(2, dtype=torch.int64, device="cuda")
    call = lambda: torch.ops.flash_attn_t.fwd(q, k, v, 0.1, False, dropout_p=p, rng_state=rng_state)[0]  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seed, offset = rng_state.tolist()
        keep = probe_keep(out, sk)
        assert torch.equal(keep, dropout_keep_mask(seed, offset, batch, heads, sq, sk, p, device="cuda"))
        masks.append(keep)
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("features", ["softcap", "alibi", "softcap+alibi"])
def test_dropout_combined_with_softcap_and_alibi(causal, features):
    """The sm80 kernels' Combined variant: dropout with softcap, ALiBi or both, against fp64 with
    the mask (softcap first, then the ALiBi bias, as flash_attn)."""
    dropout_p, heads = 0.15, 4
    q, k, v, dout = make_inputs(2, 150, 190, heads, 2, 64, torch.bfloat16, seed=len(features) + causal)
    variant = {}
    if "softcap" in features:
        variant["softcap"] = 20.0
    if "alibi" in features:
        variant["alibi_slopes"] = torch.rand(heads, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    seed, offset = next_seed_and_offset()
    out = flash_attn_func(*leaves, dropout_p=dropout_p, causal=causal, **variant)
    grads = torch.autograd.grad(out, leaves, dout)
    keep = dropout_keep_mask(seed, offset, 2, heads, 150, 190, dropout_p, device="cuda")
    check(out, grads, q, k, v, dout, causal, dropout_p, keep, **variant)
