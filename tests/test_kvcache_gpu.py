"""GPU: flash_attn_with_kvcache against an independent reference (append, rotary, cache_batch_idx,
cache_leftpad, GQA, causal), malformed index values, and CUDA-graph capture of a decode step."""
import pytest
import torch

from conftest import GPU_EACH_FAMILY, assert_close_to_ref, poison_allocator
from flash_attn_t import flash_attn_with_kvcache
from flash_attn_t.reference import attention_reference

pytestmark = GPU_EACH_FAMILY


def rotate_reference(x, cos, sin, positions, interleaved):
    """Rotary embedding in fp64 as complex products, rounded once to x's dtype."""
    half = cos.shape[1]
    rot = x[..., :2 * half].double()
    if interleaved:
        pairs = rot.unflatten(-1, (half, 2))
        z = torch.complex(pairs[..., 0], pairs[..., 1])
    else:
        z = torch.complex(rot[..., :half], rot[..., half:])
    z = z * torch.complex(cos.double()[positions], sin.double()[positions])[:, :, None, :]
    rotated = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), -1)


def expected_step(q, k_cache, v_cache, k, v, seqlens, batch_idx, leftpad, rotary, causal):
    """The caches after the append and, per sequence, (q as the kernels see it, keys, values)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch, seqlen_q = q.shape[:2]
    new = 0 if k is None else k.shape[1]
    steps = torch.arange(max(new, seqlen_q), device=q.device)
    if rotary is not None:
        cos, sin, interleaved = rotary
        k = rotate_reference(k, cos, sin, seqlens[:, None].long() + steps[None, :new], interleaved)
        q_pos = seqlens[:, None].long() + (steps[None, :seqlen_q] if causal else 0 * steps[None, :seqlen_q])
        q = rotate_reference(q, cos, sin, q_pos, interleaved)
    sequences = []
    for b in range(batch):
        row, start, end = int(batch_idx[b]), int(leftpad[b]), int(seqlens[b]) + new
        if new:
            k_cache[row, end - new:end], v_cache[row, end - new:end] = k[b], v[b]
        sequences.append((q[b:b + 1], k_cache[row:row + 1, start:end], v_cache[row:row + 1, start:end]))
    return k_cache, v_cache, sequences


CASES = [
    # (seqlen_q, seqlen_new, feature)
    (1, 1, "plain"), (1, 0, "plain"), (5, 5, "plain"), (40, 40, "plain"), (3, 0, "plain"),
    (1, 1, "int_seqlens"), (1, 1, "batch_idx"), (4, 4, "leftpad"),
    (1, 1, "rotary_interleaved"), (6, 6, "rotary_neox"), (6, 6, "rotary_interleaved_partial"),
    (1, 1, "window"), (6, 6, "window"), (1, 1, "alibi"), (6, 6, "alibi"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 111, 256])  # 80 and 111 run zero-padded to 128
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_new,feature", CASES)
def test_kvcache_against_reference(dtype, head_dim, causal, seqlen_q, seqlen_new, feature):
    batch, heads, heads_k, seqlen_cache = 3, 8, 2, 300
    torch.manual_seed(seqlen_q * 131 + seqlen_new * 7 + head_dim + causal)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=dtype)
    batch_cache = 5 if feature == "batch_idx" else batch
    k_cache = torch.randn(batch_cache, seqlen_cache, heads_k, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k = v = None
    if seqlen_new:
        k = torch.randn(batch, seqlen_new, heads_k, head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
    seqlens = torch.tensor([0, 137, seqlen_cache - seqlen_new], dtype=torch.int32, device="cuda")
    batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32, device="cuda") if feature == "batch_idx" else None
    leftpad = torch.tensor([0, 30, 129], dtype=torch.int32, device="cuda") if feature == "leftpad" else None
    rotary = None
    if feature.startswith("rotary"):
        rotary_dim = 32 if feature.endswith("partial") else head_dim - head_dim % 16
        angles = torch.rand(seqlen_cache + 64, rotary_dim // 2, device="cuda") * 6.28
        rotary = (angles.cos().to(dtype), angles.sin().to(dtype), "interleaved" in feature)
    if feature == "int_seqlens":
        seqlens = torch.full((batch,), 200, dtype=torch.int32, device="cuda")
    window = (50, 0 if causal else 9) if feature == "window" else (-1, -1)
    slopes = torch.rand(batch, heads, device="cuda") if feature == "alibi" else None  # per (sequence, head)
    expected_k, expected_v, sequences = expected_step(
        q, k_cache, v_cache, k, v, seqlens, batch_idx if batch_idx is not None else range(batch),
        leftpad if leftpad is not None else [0] * batch, rotary, causal)

    poison_allocator()
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=rotary[0] if rotary else None,
        rotary_sin=rotary[1] if rotary else None, cache_seqlens=200 if feature == "int_seqlens" else seqlens,
        cache_batch_idx=batch_idx, cache_leftpad=leftpad, causal=causal, window_size=window,
        rotary_interleaved=rotary[2] if rotary else True, alibi_slopes=slopes, return_softmax_lse=True)

    # the append: new rows as the reference wrote them (rotary: within one rounding), the rest untouched
    tol = {"rtol": 0, "atol": 0} if rotary is None else {"rtol": 2 ** -7, "atol": 1e-3}
    torch.testing.assert_close(k_cache, expected_k, **tol)
    assert torch.equal(v_cache, expected_v)
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)
    for b, (q_b, k_b, v_b) in enumerate(sequences):
        slopes_b = None if slopes is None else slopes[b]
        ref_out, ref_lse = attention_reference(q_b.double(), k_b.double(), v_b.double(), causal=causal,
                                               compute_dtype=torch.float64, window_size=window, alibi_slopes=slopes_b)
        pt_out, _ = attention_reference(q_b, k_b, v_b, causal=causal, compute_dtype=dtype, window_size=window,
                                        alibi_slopes=slopes_b)
        assert_close_to_ref(out[b:b + 1], ref_out, pt_out, f"out[{b}] {feature}")
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(lse[b:b + 1]), ~finite)
        if finite.any():
            assert (lse[b:b + 1][finite].double() - ref_lse[finite]).abs().max().item() < 2e-2


def test_kvcache_malformed_index_values_never_fault(monkeypatch):
    """Out-of-range cache_seqlens / cache_batch_idx / cache_leftpad are clamped by the kernels (no
    host sync to check them); FLASH_ATTN_T_CHECK_VALUES=1 turns them into clear errors."""
    q = torch.randn(3, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    v_cache, k = torch.randn_like(k_cache), torch.randn(3, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    bad = {
        "cache_seqlens": torch.tensor([-7, 10 ** 6, 5], dtype=torch.int32, device="cuda"),
        "cache_batch_idx": torch.tensor([5, -1, 1], dtype=torch.int32, device="cuda"),
        "cache_leftpad": torch.tensor([-3, 100, 2], dtype=torch.int32, device="cuda"),
    }
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, k.clone(), causal=True, **bad)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    monkeypatch.setenv("FLASH_ATTN_T_CHECK_VALUES", "1")
    for name in bad:
        good = {"cache_seqlens": torch.tensor([0, 3, 5], dtype=torch.int32, device="cuda"),
                "cache_batch_idx": torch.tensor([0, 1, 1], dtype=torch.int32, device="cuda"),
                "cache_leftpad": torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")}
        good[name] = bad[name]
        with pytest.raises(ValueError, match=name):
            flash_attn_with_kvcache(q, k_cache, v_cache, k, k.clone(), **good)


def test_kvcache_decode_step_replays_in_a_cuda_graph():
    """A decode step (append one token, attend) captured once and replayed with new q, k, v and
    cache_seqlens values gives what an eager call on the same inputs gives."""
    batch, heads, heads_k, head_dim, seqlen_cache = 2, 8, 2, 128, 512
    k_cache = torch.randn(batch, seqlen_cache, heads_k, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 1, heads_k, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([10, 300], dtype=torch.int32, device="cuda")
    angles = torch.rand(seqlen_cache, head_dim // 2, device="cuda") * 6.28
    cos, sin = angles.cos(), angles.sin()

    def step(k_cache, v_cache):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=seqlens, causal=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(k_cache, v_cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(k_cache, v_cache)

    for new_lengths in ([0, 511], [257, 42]):
        q.normal_(), k.normal_(), v.normal_()
        seqlens.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        eager_k, eager_v = k_cache.clone(), v_cache.clone()
        expected = step(eager_k, eager_v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqlen_q,causal", [(1, True), (1, False), (3, False)])
@pytest.mark.parametrize("heads,heads_k", [(8, 2), (4, 4)])
@pytest.mark.parametrize("num_splits", [0, 1, 7])
@pytest.mark.parametrize("softcap", [0.0, 10.0])
def test_split_kv_decode_against_reference(dtype, head_dim, seqlen_q, causal, heads, heads_k, num_splits, softcap):
    """Few query rows against long caches: the split-KV path (packed query heads, keys cut into
    splits, merged through lse) with lengths 0, 1 and odd, cache_batch_idx and cache_leftpad,
    with and without softcap."""
    from flash_attn_t import decode
    batch, seqlen_cache = 4, 3000
    torch.manual_seed(seqlen_q + head_dim + num_splits)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=dtype)
    k_cache = torch.randn(5, seqlen_cache, heads_k, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.tensor([0, 1, 1234, seqlen_cache], dtype=torch.int32, device="cuda")
    batch_idx = torch.tensor([4, 0, 2, 1], dtype=torch.int32, device="cuda")
    leftpad = torch.tensor([0, 0, 17, 2999], dtype=torch.int32, device="cuda")
    assert decode.plan(q, k_cache, causal, num_splits=num_splits) or (num_splits == 1 and heads == heads_k)
    poison_allocator()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                                       cache_leftpad=leftpad, causal=causal, num_splits=num_splits,
                                       softcap=softcap, return_softmax_lse=True)
    for b in range(batch):
        row, keys = int(batch_idx[b]), slice(int(leftpad[b]), int(seqlens[b]))
        k_b, v_b = k_cache[row:row + 1, keys], v_cache[row:row + 1, keys]
        ref_out, ref_lse = attention_reference(q[b:b + 1].double(), k_b.double(), v_b.double(), causal=causal,
                                               softcap=softcap)
        pt_out, _ = attention_reference(q[b:b + 1], k_b, v_b, causal=causal, compute_dtype=dtype, softcap=softcap)
        assert_close_to_ref(out[b:b + 1], ref_out, pt_out, f"out[{b}]")
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(lse[b:b + 1]), ~finite)
        if finite.any():
            assert (lse[b:b + 1][finite].double() - ref_lse[finite]).abs().max().item() < 2e-2


@pytest.mark.parametrize("num_splits", [0, 1])
@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (3, True)])
def test_kvcache_learnable_sink_against_reference(num_splits, seqlen_q, causal):
    """learnable_sink in flash_attn_with_kvcache, split and not, with an empty sequence (its rows
    get lse = the sink and out = 0)."""
    batch, heads, heads_k, head_dim, dtype = 3, 8, 2, 128, torch.bfloat16
    torch.manual_seed(seqlen_q + num_splits)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=dtype)
    k_cache = torch.randn(batch, 2000, heads_k, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.tensor([0, 5, 1999], dtype=torch.int32, device="cuda")
    sink = torch.linspace(-1.0, 4.0, heads, device="cuda")
    poison_allocator()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=causal,
                                       num_splits=num_splits, return_softmax_lse=True, learnable_sink=sink)
    for b in range(batch):
        k_b, v_b = k_cache[b:b + 1, :int(seqlens[b])], v_cache[b:b + 1, :int(seqlens[b])]
        ref_out, ref_lse = attention_reference(q[b:b + 1].double(), k_b.double(), v_b.double(), causal=causal,
                                               sinks=sink.double())
        pt_out, _ = attention_reference(q[b:b + 1], k_b, v_b, causal=causal, compute_dtype=dtype, sinks=sink)
        assert_close_to_ref(out[b:b + 1], ref_out, pt_out, f"out[{b}]")
        assert (lse[b:b + 1].double() - ref_lse).abs().max().item() < 2e-2


@pytest.mark.parametrize("heads,heads_k", [(8, 2), (8, 8)])
def test_flash_attn_func_one_query_row_against_many_keys(heads, heads_k):
    """flash_attn_func with one query row per sequence and a long key sequence takes the split-KV
    forward; its out and lse feed the usual backward."""
    from flash_attn_t import decode, flash_attn_func
    q = torch.randn(2, 1, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 5000, heads_k, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    assert decode.plan(q, k, True)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    results = []
    for compute in (torch.float64, torch.bfloat16):
        leaves = [t.detach().to(compute).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_reference(*leaves, causal=True, compute_dtype=compute)
        results.append((ref_out, ref_lse, torch.autograd.grad(ref_out, leaves, dout.to(compute))))
    (ref_out, ref_lse, ref_grads), (pt_out, _, pt_grads) = results
    assert_close_to_ref(out, ref_out, pt_out, "out")
    assert (lse.double() - ref_lse).abs().max().item() < 2e-2
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("splits,seqlen_q,group", [(1, 1, 4), (7, 1, 4), (40, 2, 3), (3, 5, 1)])
def test_merge_splits_kernel_matches_the_merge(dtype, head_dim, splits, seqlen_q, group):
    """torch.ops.flash_attn_t.merge_splits against decode.merge_splits (fp64) and the row-to-head
    unpacking: splits without keys (lse +inf) and a row that no split saw (out 0, lse +inf)."""
    from flash_attn_t import decode
    batch, heads_k = 3, 2
    rows = seqlen_q * group
    torch.manual_seed(splits + seqlen_q + head_dim)
    out = torch.randn(batch * splits, rows, heads_k, head_dim, device="cuda").to(dtype)
    lse = torch.randn(batch * splits, heads_k, rows, device="cuda") * 4
    lse[::2, 0, 0] = float("inf")  # splits that saw no key
    lse.view(batch, splits, heads_k, rows)[1, :, 1, -1] = float("inf")  # a row no split saw
    got_out, got_lse = torch.ops.flash_attn_t.merge_splits(out, lse, splits, group)
    ref_out, ref_lse = decode.merge_splits(out.double().view(batch, splits, rows, heads_k, head_dim),
                                           lse.double().view(batch, splits, heads_k, rows))
    ref_out = ref_out.view(batch, seqlen_q, group, heads_k, head_dim).transpose(2, 3).reshape(got_out.shape)
    ref_lse = ref_lse.view(batch, heads_k, seqlen_q, group).transpose(2, 3).reshape(got_lse.shape)
    assert got_out.dtype == dtype and got_lse.dtype == torch.float32
    torch.testing.assert_close(got_out.double(), ref_out, rtol=1e-2, atol=1e-2)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(ref_lse)) and torch.isinf(got_lse).any()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(got_lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert (got_out.view(batch, seqlen_q, heads_k * group, head_dim)[~finite.transpose(1, 2)] == 0).all()


def paged_copy(contiguous_k, contiguous_v, page_size):
    """The caches (batch, pages_per_seq x page_size, heads_k, d) as shuffled page pools with two
    pages to spare, and the block table."""
    batch, seqlen = contiguous_k.shape[:2]
    pages_per_seq = seqlen // page_size
    table = torch.randperm(batch * pages_per_seq + 2, device="cuda")[:batch * pages_per_seq]
    table = table.view(batch, pages_per_seq).to(torch.int32)
    pools = []
    for cache in (contiguous_k, contiguous_v):
        pool = torch.zeros(batch * pages_per_seq + 2, page_size, *cache.shape[2:], device="cuda", dtype=cache.dtype)
        pool[table.long()] = cache.view(batch, pages_per_seq, page_size, *cache.shape[2:])
        pools.append(pool)
    return pools[0], pools[1], table


@pytest.mark.parametrize("page_size", [16, 48, 144, 256, 384])
@pytest.mark.parametrize("seqlen_q,causal", [(1, True), (5, True), (3, False)])
def test_paged_kvcache_matches_the_contiguous_cache(page_size, seqlen_q, causal):
    """block_table: a paged cache (pages shuffled, a table longer than some sequences need) gives
    the contiguous cache's output and lse, with an append that crosses page boundaries, lengths 0
    and not a multiple of the page size, split-KV (one query row: the paged splits start at
    multiples of the kernel's box, so the merge order differs a little) or not. Page sizes that
    divide the 128-key block, are multiples of it, and neither (48, 144: boxes of 16 rows)."""
    batch, heads, heads_k, head_dim = 3, 8, 2, 128
    pages_per_seq = -(-1024 // page_size)
    torch.manual_seed(page_size + seqlen_q)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(batch, seqlen_q, heads_k, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    contiguous_k = torch.randn(batch, pages_per_seq * page_size, heads_k, head_dim, device="cuda",
                               dtype=torch.bfloat16)
    contiguous_v = torch.randn_like(contiguous_k)
    paged_k, paged_v, table = paged_copy(contiguous_k, contiguous_v, page_size)
    seqlens = torch.tensor([0, page_size - 1, 1000], dtype=torch.int32, device="cuda")
    expected = flash_attn_with_kvcache(q, contiguous_k, contiguous_v, k_new, v_new, cache_seqlens=seqlens,
                                       causal=causal, return_softmax_lse=True)
    poison_allocator()
    got = flash_attn_with_kvcache(q, paged_k, paged_v, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                  causal=causal, return_softmax_lse=True)
    torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
    flat = lambda paged: paged[table.long()].flatten(1, 2)  # noqa: E731
    assert torch.equal(flat(paged_k), contiguous_k) and torch.equal(flat(paged_v), contiguous_v)


@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "sink"])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_paged_kvcache_with_features(feature, seqlen_q):
    """Each feature on a paged cache matches the same call on the contiguous cache (checked against
    the reference above): window and sinks run in the paged kernels, softcap and ALiBi on pages
    gathered into a contiguous copy."""
    batch, heads, heads_k, head_dim, page_size, pages_per_seq = 2, 8, 2, 128, 48, 12
    torch.manual_seed(seqlen_q)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    contiguous_k = torch.randn(batch, pages_per_seq * page_size, heads_k, head_dim, device="cuda",
                               dtype=torch.bfloat16)
    contiguous_v = torch.randn_like(contiguous_k)
    paged_k, paged_v, table = paged_copy(contiguous_k, contiguous_v, page_size)
    seqlens = torch.tensor([300, 571], dtype=torch.int32, device="cuda")
    kwargs = {"window": dict(window_size=(100, 0)), "softcap": dict(softcap=20.0),
              "alibi": dict(alibi_slopes=torch.rand(heads, device="cuda")),
              "sink": dict(learnable_sink=torch.randn(heads, device="cuda"))}[feature]
    expected = flash_attn_with_kvcache(q, contiguous_k, contiguous_v, cache_seqlens=seqlens, causal=True,
                                       return_softmax_lse=True, **kwargs)
    poison_allocator()
    got = flash_attn_with_kvcache(q, paged_k, paged_v, cache_seqlens=seqlens, block_table=table, causal=True,
                                  return_softmax_lse=True, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)


def test_strided_index_tensors_match_contiguous_ones():
    """cache_seqlens / cache_leftpad / cache_batch_idx as strided views (a column of a larger
    tensor, as the transformers integration's key ranges are) read like their contiguous copies."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    q = torch.randn(3, 2, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_cache, v_cache = (torch.randn(4, 100, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
                        for _ in range(2))
    index = torch.tensor([[50, 3, 1], [7, 0, 3], [100, 20, 0]], device="cuda", dtype=torch.int32)
    strided = dict(cache_seqlens=index[:, 0], cache_leftpad=index[:, 1], cache_batch_idx=index[:, 2])
    assert not strided["cache_seqlens"].is_contiguous()
    for causal in (False, True):
        got = flash_attn_with_kvcache(q, k_cache, v_cache, causal=causal, **strided)
        expected = flash_attn_with_kvcache(q, k_cache, v_cache, causal=causal,
                                           **{name: t.contiguous() for name, t in strided.items()})
        assert torch.equal(got, expected)
