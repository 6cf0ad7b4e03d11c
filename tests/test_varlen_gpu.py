"""GPU: variable-length (packed) batches against the fp64 reference, with lengths 0, 1 and odd."""
import pytest
import torch

from conftest import GPU_EACH_FAMILY, assert_close_to_ref, poison_allocator
from flash_attn_t import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func
from flash_attn_t.reference import attention_reference

pytestmark = GPU_EACH_FAMILY


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 59, 96, 128, 256])  # 59 and 96 run zero-padded to 64 / 128
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("heads,heads_k", [(4, 4), (6, 2)])
def test_varlen_against_fp64(dtype, head_dim, causal, deterministic, heads, heads_k):
    lens_q = [0, 1, 17, 64, 113, 300]
    lens_k = [5, 1, 0, 200, 113, 129]
    torch.manual_seed(sum(lens_q) + head_dim)
    q = torch.randn(sum(lens_q), heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), heads_k, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), heads_k, head_dim, device="cuda", dtype=dtype)
    dout = torch.randn_like(q)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    poison_allocator()
    out, lse, _ = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         deterministic=deterministic, return_attn_probs=True)
    poison_allocator()
    grads = torch.autograd.grad(out, leaves, dout)
    assert lse.shape == (heads, sum(lens_q))

    refs = []
    for compute_dtype in (torch.float64, dtype):
        ref_leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_reference(*ref_leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                               compute_dtype=compute_dtype)
        refs.append((ref_out, ref_lse, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute_dtype))))
    (ref_out, ref_lse, ref_grads), (pt_out, _, pt_grads) = refs
    assert_close_to_ref(out, ref_out, pt_out, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < 1e-2
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_hd256_with_more_tiles_than_sms(causal):
    # The persistent kernels' tiles over a varlen batch: grids sized by the longest sequence, so
    # most tiles of the shorter ones are empty and skipped, and at least two per SM (8 q / 4 kv
    # heads: 96 tiles per sequence of 1536 in each hd256 grid).
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    pattern_q, pattern_k = [1536, 0, 700, 1, 1200, 129], [1536, 5, 900, 1, 0, 300]
    repeats = -(-2 * sms // (96 * len(pattern_q)))
    lens_q, lens_k = pattern_q * repeats, pattern_k * repeats
    torch.manual_seed(7)
    q = torch.randn(sum(lens_q), 8, 256, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), 4, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    poison_allocator()
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    poison_allocator()
    grads = torch.autograd.grad(out, leaves, dout)
    refs = []
    for compute_dtype in (torch.float64, torch.bfloat16):
        ref_leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, _ = attention_reference(*ref_leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                         compute_dtype=compute_dtype)
        refs.append((ref_out, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute_dtype))))
    (ref_out, ref_grads), (pt_out, pt_grads) = refs
    assert_close_to_ref(out, ref_out, pt_out, "out")
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(16, 0), (40, 7), (-1, 3)])
def test_varlen_sliding_window_against_fp64(causal, window):
    lens_q, lens_k = [0, 1, 17, 130, 300], [5, 1, 0, 200, 129]
    torch.manual_seed(window[0] + 3)
    q = torch.randn(sum(lens_q), 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window)
    grads = torch.autograd.grad(out, leaves, dout)
    refs = []
    for compute_dtype in (torch.float64, torch.bfloat16):
        ref_leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, _ = attention_reference(*ref_leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                         compute_dtype=compute_dtype, window_size=window)
        refs.append((ref_out, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute_dtype))))
    (ref_out, ref_grads), (pt_out, pt_grads) = refs
    assert_close_to_ref(out, ref_out, pt_out, "out")
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (40, 7)])
def test_varlen_alibi_against_fp64(causal, window):
    """alibi_slopes (batch, nheads) over varlen sequences (lengths 0 and 1 among them), alone and
    with a window: out and gradients against the fp64 reference, within twice PyTorch's error and
    1% in norm."""
    lens_q, lens_k = [0, 1, 17, 130, 300], [5, 1, 0, 200, 129]
    torch.manual_seed(window[0] + 11)
    q = torch.randn(sum(lens_q), 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    slopes = torch.rand(len(lens_q), 8, device="cuda")
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window,
                                 alibi_slopes=slopes)
    grads = torch.autograd.grad(out, leaves, dout)
    refs = []
    for compute_dtype in (torch.float64, torch.bfloat16):
        ref_leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, _ = attention_reference(*ref_leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                         compute_dtype=compute_dtype, window_size=window, alibi_slopes=slopes)
        refs.append((ref_out, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute_dtype))))
    (ref_out, ref_grads), (pt_out, pt_grads) = refs
    assert_close_to_ref(out, ref_out, pt_out, "out")
    for name, x, ref, pt in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (pt_out, *pt_grads)):
        assert_close_to_ref(x, ref, pt, name)
        assert (x.double() - ref).norm() <= 1e-2 * ref.norm(), name


def test_varlen_packed_forms_match_unpacked():
    lens = [3, 0, 70, 129]
    cu, max_len = cu_seqlens(lens), max(lens)
    qkv = torch.randn(sum(lens), 3, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in qkv.unbind(1)]
    expected = flash_attn_varlen_func(*leaves, cu, cu, max_len, max_len, causal=True, deterministic=True)
    expected_grads = torch.autograd.grad(expected, leaves, dout)

    out = flash_attn_varlen_qkvpacked_func(qkv, cu, max_len, causal=True, deterministic=True)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(out, expected) and torch.equal(dqkv, torch.stack(expected_grads, dim=1))

    q, kv = leaves[0], qkv.detach()[:, 1:].requires_grad_()
    out = flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max_len, max_len, causal=True, deterministic=True)
    dq, dkv = torch.autograd.grad(out, (q, kv), dout)
    assert torch.equal(out, expected) and torch.equal(dq, expected_grads[0])
    assert torch.equal(dkv, torch.stack(expected_grads[1:], dim=1))


@pytest.mark.parametrize("total_q,total_k", [(0, 0), (0, 12), (9, 0)])
def test_varlen_nothing_to_attend(total_q, total_k):
    q = torch.randn(total_q, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(total_k, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    cu_q, cu_k = cu_seqlens([0, total_q]), cu_seqlens([total_k, 0])
    out, lse, _ = flash_attn_varlen_func(q, k, k, cu_q, cu_k, total_q, total_k, causal=True, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, total_q)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert torch.equal(k.grad, torch.zeros_like(k.grad))


def test_varlen_malformed_cu_seqlens_never_fault(monkeypatch):
    """GPU cu_seqlens values are not read on the host by default (no sync): the kernels clamp
    them, so malformed ones never read or write out of bounds; FLASH_ATTN_T_CHECK_VALUES=1 checks
    them and raises. Shape and dtype rules always apply."""
    q = torch.randn(10, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    for offsets in ([0, 4, 9], [0, 40, 3], [-5, 2, 1000]):
        cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        out = flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True)
        out.sum().backward()
        torch.cuda.synchronize()
    monkeypatch.setenv("FLASH_ATTN_T_CHECK_VALUES", "1")
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] \(9\) must equal the number of tokens"):
        flash_attn_varlen_func(q, q, q, cu, cu, 5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a CUDA tensor, got cpu"):
        flash_attn_varlen_func(q, q, q, cu.cpu(), cu, 5, 5)


def test_varlen_forward_and_backward_replay_in_a_cuda_graph():
    """No host synchronisation in the varlen path: a forward + backward captured once replays
    with new values in q, k, v, dout and cu_seqlens (same shapes) and matches eager calls
    bitwise (deterministic mode: a fixed dQ summation order in both)."""
    lens = [[3, 0, 70, 55], [64, 1, 0, 63]]
    heads, heads_k, head_dim, total = 4, 2, 128, 128
    q = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(total, heads_k, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    cu = cu_seqlens(lens[0])

    def step():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = flash_attn_varlen_func(*leaves, cu, cu, 70, 70, causal=True, deterministic=True)
        return (out, *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for lengths in lens[::-1]:
        for t in (q, k, v, dout):
            t.normal_()
        cu.copy_(cu_seqlens(lengths))
        expected = step()
        graph.replay()
        torch.cuda.synchronize()
        for name, got, want in zip(("out", "dq", "dk", "dv"), captured, expected):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("page_size", [16, 48, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "alibi"])
def test_paged_prefill_matches_packed_keys(page_size, causal, feature):
    """block_table (a paged prefill): the keys of each sequence in shuffled pages of a pool give the
    packed call's output and lse (the paged sm90 kernels read the pages in place; softcap, ALiBi
    and the sm80 family read them gathered), with lengths 0 and 1, sequences spanning pages and a
    table longer than some sequences need."""
    lens_q, lens_k = [0, 1, 17, 64, 130], [5, 1, 0, 200, 300]
    heads, heads_k, head_dim, batch = 8, 2, 128, len(lens_q)
    torch.manual_seed(page_size + causal)
    q = torch.randn(sum(lens_q), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), heads_k, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pages_per_seq = -(-max(lens_k) // page_size)
    table = torch.randperm(batch * pages_per_seq + 3, device="cuda")[:batch * pages_per_seq].view(batch, -1)
    k_pool, v_pool = (torch.randn(batch * pages_per_seq + 3, page_size, heads_k, head_dim, device="cuda",
                                  dtype=torch.bfloat16) for _ in range(2))
    start = 0
    for b, n in enumerate(lens_k):
        rows = torch.arange(n, device="cuda")
        pages, offsets = table[b, rows // page_size], rows % page_size
        k_pool[pages, offsets], v_pool[pages, offsets] = k[start:start + n], v[start:start + n]
        start += n
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    kwargs = {"plain": {}, "window": dict(window_size=(40, 0 if causal else 7)), "softcap": dict(softcap=20.0),
              "alibi": dict(alibi_slopes=torch.rand(heads, device="cuda"))}[feature]
    with torch.no_grad():
        expected = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                          return_attn_probs=True, **kwargs)
        poison_allocator()
        got = flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                     return_attn_probs=True, block_table=table.to(torch.int32), **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
