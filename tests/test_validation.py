"""CPU: every bad-input rule raises before any kernel runs, naming the argument and the rule.

Each rule is tested on its check_* function with plain CPU tensors (check_devices runs first in
every entry point, so CPU input never reaches the later rules through the public functions).
That every public function runs the checks is tested with tensors on a fake 'cuda' device
(FakeTensorMode: shapes, dtypes and devices without memory or a GPU).
"""
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_attn_t
from flash_attn_t import ops
from flash_attn_t.interface import (KERNEL_FEATURES, check_cu_seqlens, check_devices, check_dtypes,
                                    check_packed_shape, check_shapes, check_softmax_scale, check_strides,
                                    check_unimplemented, check_varlen, check_window_size)


def batched(b=2, sq=8, sk=8, h=4, hk=2, d=64, dtype=torch.bfloat16, device="cpu"):
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    return q, k, torch.randn_like(k)


def varlen(total_q=10, total_k=12, h=4, hk=2, d=64, dtype=torch.float16, device="cpu"):
    q = torch.randn(total_q, h, d, dtype=dtype, device=device)
    k = torch.randn(total_k, hk, d, dtype=dtype, device=device)
    return q, k, torch.randn_like(k)


def cu(offsets, device="cpu"):
    return torch.tensor(offsets, dtype=torch.int32, device=device)


# --- the public functions, with fake CUDA tensors ----------------------------------------------

@pytest.fixture
def fake_cuda():
    with FakeTensorMode():
        yield


def call_every_entry_point(q, k, v, **kwargs):
    """Yields (name, thunk) for each public function, fed the batched q, k, v (or packed from them)."""
    b, sq, _, _ = q.shape
    sk = k.shape[1]
    qkv = torch.stack([q, k, v], dim=2) if q.shape == k.shape else None
    kv = torch.stack([k, v], dim=2)
    cu_q, cu_k = cu([i * sq for i in range(b + 1)], q.device), cu([i * sk for i in range(b + 1)], q.device)
    flat = lambda t: t.flatten(0, 1)  # noqa: E731
    yield "flash_attn_func", lambda: flash_attn_t.flash_attn_func(q, k, v, **kwargs)
    yield "flash_attn_kvpacked_func", lambda: flash_attn_t.flash_attn_kvpacked_func(q, kv, **kwargs)
    yield "flash_attn_varlen_func", lambda: flash_attn_t.flash_attn_varlen_func(
        flat(q), flat(k), flat(v), cu_q, cu_k, sq, sk, **kwargs)
    yield "flash_attn_varlen_kvpacked_func", lambda: flash_attn_t.flash_attn_varlen_kvpacked_func(
        flat(q), flat(kv), cu_q, cu_k, sq, sk, **kwargs)
    if qkv is not None:
        yield "flash_attn_qkvpacked_func", lambda: flash_attn_t.flash_attn_qkvpacked_func(qkv, **kwargs)
        yield "flash_attn_varlen_qkvpacked_func", lambda: flash_attn_t.flash_attn_varlen_qkvpacked_func(
            flat(qkv), cu_q, sq, **kwargs)


def test_cpu_tensors_are_rejected_by_every_entry_point():
    q, k, v = batched(hk=4)
    names = []
    for name, call in call_every_entry_point(q, k, v):
        with pytest.raises(ValueError, match=r"(q|qkv) must be a CUDA tensor, got cpu"):
            call()
        names.append(name)
    assert len(names) == 6


def test_every_entry_point_checks_dtype_head_dim_and_heads(fake_cuda):
    for bad, error, match in [
        (dict(dtype=torch.float32), TypeError, r"q.dtype must be torch.float16 or torch.bfloat16, got torch.float32"),
        (dict(d=264), ValueError, r"head dim 264 is not supported"),
        (dict(h=3, hk=2), ValueError, r"nheads \(3\) must be a multiple of nheads_k \(2\)"),
    ]:
        q, k, v = batched(**{"device": "cuda", **bad})
        for name, call in call_every_entry_point(q, k, v):
            with pytest.raises(error, match=match):
                call()


@pytest.mark.parametrize("kwargs", [dict(dropout_p=0.1, softcap=5.0), dict(dropout_p=0.1, alibi_slopes="slopes"),
                                    dict(softcap=5.0, alibi_slopes="slopes"),
                                    dict(dropout_p=0.1, softcap=5.0, alibi_slopes="slopes", causal=True)])
def test_every_entry_point_takes_feature_combinations(fake_cuda, kwargs):
    q, k, v = batched(hk=4, device="cuda")
    if kwargs.get("alibi_slopes") == "slopes":
        kwargs = {**kwargs, "alibi_slopes": torch.ones(q.shape[2], device="cuda")}
    names = []
    for name, call in call_every_entry_point(q, k, v, **kwargs):
        assert call().shape[-2:] == q.shape[-2:], name
        names.append(name)
    assert len(names) == 6


@pytest.mark.parametrize("dropout_p,error", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                             (None, TypeError), ("x", TypeError)])
def test_every_entry_point_checks_dropout_p(fake_cuda, dropout_p, error):
    q, k, v = batched(hk=4, device="cuda")
    names = []
    for name, call in call_every_entry_point(q, k, v, dropout_p=dropout_p):
        with pytest.raises(error, match="dropout_p must"):
            call()
        names.append(name)
    assert len(names) == 6


def paged_prefill_inputs(pool=(5, 16)):
    """varlen q of two sequences (4 and 6 tokens) against pages of a pool (num_pages, page_size)
    holding 20 and 12 keys through a block table of two pages each."""
    q = torch.randn(10, 4, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(*pool, 2, 64, dtype=torch.bfloat16, device="cuda")
    return dict(q=q, k=k, v=torch.randn_like(k), cu_seqlens_q=cu([0, 4, 10], "cuda"),
                cu_seqlens_k=cu([0, 20, 32], "cuda"), max_seqlen_q=6, max_seqlen_k=20,
                block_table=torch.tensor([[4, 0], [2, 3]], dtype=torch.int32, device="cuda"))


def test_varlen_takes_a_block_table(fake_cuda):
    """flash_attn_varlen_func with block_table (a paged prefill): k, v pools of pages; out has q's shape."""
    args = paged_prefill_inputs()
    out, lse, _ = flash_attn_t.flash_attn_varlen_func(**args, causal=True, return_attn_probs=True)
    assert out.shape == args["q"].shape and lse.shape == (4, 10)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: dict(k=a["k"][0], v=a["v"][0]), ValueError, r"with block_table, k must be a pool of pages"),
    (lambda a: dict(block_table=a["block_table"].long()), TypeError, "block_table must be int32"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError, r"block_table must have shape \(batch, max_pages\)"),
    (lambda a: dict(k=a["k"][:, :8], v=a["v"][:, :8]), ValueError, "page size .* must be a multiple of 16"),
    (lambda a: dict(q=a["q"].requires_grad_()), NotImplementedError, "forward only"),
])
def test_paged_prefill_rules(fake_cuda, change, error, match):
    args = paged_prefill_inputs()
    with pytest.raises(error, match=match):
        flash_attn_t.flash_attn_varlen_func(**{**args, **change(args)})


def test_paged_prefill_sequences_fit_their_pages():
    """CPU offsets are checked on the host: a sequence longer than its pages is refused."""
    from flash_attn_t.interface import check_varlen
    q, k = torch.empty(10, 4, 64), torch.empty(5, 16, 2, 64)
    check_varlen(q, k, cu([0, 4, 10]), cu([0, 20, 52]), 6, 32, capacity=32)
    with pytest.raises(ValueError, match="a sequence of 33 keys exceeds its pages"):
        check_varlen(q, k, cu([0, 4, 10]), cu([0, 20, 53]), 6, 33, capacity=32)


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="a fake cuda:1 needs no GPU or two of them")
def test_mixed_devices(fake_cuda):
    q, k, v = batched(device="cuda")
    with pytest.raises(ValueError, match="v is on cuda:1 but q is on cuda:0: all inputs must be on one device"):
        flash_attn_t.flash_attn_func(q, k, v.to("cuda:1"))
    with pytest.raises(ValueError, match="kv is on cuda:1 but q is on cuda:0"):
        flash_attn_t.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2).to("cuda:1"))


def test_cu_seqlens_on_another_device(fake_cuda):
    qv, kv, vv = varlen(device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens_k must be a CUDA tensor, got cpu"):
        flash_attn_t.flash_attn_varlen_func(qv, kv, vv, cu([0, 10], "cuda"), cu([0, 12]), 10, 12)


# --- each rule on its check_* function ---------------------------------------------------------

def test_devices():
    q, k, v = batched()
    with pytest.raises(TypeError, match="v must be a torch.Tensor, got list"):
        check_devices(q=q, k=k, v=[1, 2])
    with pytest.raises(ValueError, match="q must be a CUDA tensor, got cpu") as cpu_error:
        check_devices(q=q, k=k, v=v)
    # a CPU user is pointed at the exact CPU implementation
    assert "flash_attn_t.reference.attention_reference" in str(cpu_error.value)
    with pytest.raises(ValueError, match="k must be a CUDA tensor, got meta$"):
        check_devices(k=k.to("meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_are_rejected(dtype):
    q, k, v = (t.to(dtype) for t in batched())
    with pytest.raises(TypeError, match=rf"q.dtype must be torch.float16 or torch.bfloat16, got {dtype}.*\.half\(\)"):
        check_dtypes(q, k, v)


def test_integer_dtype_is_rejected():
    q, k, v = (t.to(torch.int32) for t in batched())
    with pytest.raises(TypeError, match=r"q.dtype must be torch.float16 or torch.bfloat16, got torch.int32$"):
        check_dtypes(q, k, v)


def test_mixed_dtypes():
    q, k, v = batched()
    with pytest.raises(TypeError, match=r"k.dtype \(torch.float16\) must match q.dtype \(torch.bfloat16\)"):
        check_dtypes(q, k.half(), v)
    with pytest.raises(TypeError, match=r"v.dtype \(torch.float16\) must match q.dtype \(torch.bfloat16\)"):
        check_dtypes(q, k, v.half())
    check_dtypes(q, k, v)


def test_rank():
    q, k, v = batched()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(batch, seqlen, nheads, headdim\), got shape"):
        check_shapes(q[0], k, v, varlen=False)
    with pytest.raises(ValueError, match=r"k must have 3 dimensions \(total_tokens, nheads, headdim\)"):
        check_shapes(q[0], k, v[0], varlen=True)
    check_shapes(q[0], k[0], v[0], varlen=True)


def test_shape_mismatches():
    q, k, v = batched()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        check_shapes(q, k, v[:, :4], varlen=False)
    with pytest.raises(ValueError, match=r"k's batch size \(1\) must equal q's \(2\)"):
        check_shapes(q, k[:1], v[:1], varlen=False)
    _, k128, v128 = batched(d=128)
    with pytest.raises(ValueError, match=r"k's head dim \(128\) must equal q's \(64\)"):
        check_shapes(q, k128, v128, varlen=False)
    check_shapes(q, k, v, varlen=False)
    check_shapes(q, k[:, :3], v[:, :3], varlen=False)  # seqlen_k != seqlen_q is fine


@pytest.mark.parametrize("d", [0, 257, 320, 512])
def test_unsupported_head_dim(d):
    q, k, v = batched(d=d)
    with pytest.raises(ValueError, match=rf"head dim {d} is not supported: head dims must lie in \[1, 256\]"):
        check_shapes(q, k, v, varlen=False)


@pytest.mark.parametrize("d", flash_attn_t.interface.SUPPORTED_HEAD_DIMS)
def test_supported_head_dims_pass(d):
    check_shapes(*batched(d=d), varlen=False)


@pytest.mark.parametrize("h,hk", [(6, 4), (4, 3), (4, 0)])
def test_heads_not_a_multiple_of_kv_heads(h, hk):
    q, k, v = batched(h=h, hk=hk)
    with pytest.raises(ValueError, match=rf"nheads \({h}\) must be a multiple of nheads_k \({hk}\)"):
        check_shapes(q, k, v, varlen=False)


def test_non_contiguous_last_dim():
    q, k, v = batched()
    strided = torch.randn(2, 8, 4, 128, dtype=torch.bfloat16)[..., ::2]
    assert strided.shape == q.shape and strided.stride(-1) == 2
    with pytest.raises(ValueError, match=r"q must have a contiguous last dimension \(stride 1\), got stride 2"):
        check_strides(strided, k, v)
    with pytest.raises(ValueError, match=r"v must have a contiguous last dimension"):
        check_strides(q, k, strided[:, :, :2])
    # other strides are free: a transposed (b, h, s, d) tensor and a slice of a packed one pass
    check_strides(torch.randn(2, 4, 8, 64).transpose(1, 2), k, torch.randn(2, 8, 3, 2, 64)[:, :, 1])


def test_packed_shapes():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\), got \(1, 4, 2,"):
        check_packed_shape(torch.randn(1, 4, 2, 2, 64), "qkv", 2, 3, "(batch, seqlen, 3, nheads, headdim)")
    with pytest.raises(ValueError, match=r"kv must have shape \(total_tokens, 2, nheads_k, headdim\)"):
        check_packed_shape(torch.randn(4, 2, 64), "kv", 1, 2, "(total_tokens, 2, nheads_k, headdim)")
    check_packed_shape(torch.randn(4, 2, 3, 64), "kv", 1, 2, "(total_tokens, 2, nheads_k, headdim)")


def test_packed_shapes_through_the_public_functions(fake_cuda):
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_t.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 64, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match=r"kv must have shape \(total_tokens, 2, nheads_k, headdim\)"):
        q = torch.randn(4, 2, 64, dtype=torch.float16, device="cuda")
        flash_attn_t.flash_attn_varlen_kvpacked_func(q, q, cu([0, 4], "cuda"), cu([0, 4], "cuda"), 4, 4)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_softmax_scale(scale):
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
        check_softmax_scale(scale, 64)


def test_default_softmax_scale():
    assert check_softmax_scale(None, 64) == 0.125
    assert check_softmax_scale(None, 128) == pytest.approx(128 ** -0.5)
    assert check_softmax_scale(0.3, 64) == 0.3


@pytest.mark.parametrize("window, error, match", [
    ((-2, 0), ValueError, r"window_size entries must be >= -1 \(-1: unbounded\), got \(-2, 0\)"),
    ((1.5, 0), TypeError, "window_size must be a pair of ints"),
    ((3,), TypeError, "window_size must be a pair of ints"),
    (5, TypeError, "window_size must be a pair of ints"),
])
def test_bad_window_size(window, error, match):
    with pytest.raises(error, match=match):
        check_window_size(window)


def test_window_size_normalised():
    assert check_window_size([4, -1]) == (4, -1) and check_window_size((torch.tensor(2), 0)) == (2, 0)


def test_every_entry_point_takes_a_learnable_sink(fake_cuda):
    """learnable_sink (nheads,): accepted by every entry point (shapes of the result), its rules
    named in the errors."""
    q, k, v = batched(hk=4, device="cuda")
    heads = q.shape[2]
    names = []
    for name, call in call_every_entry_point(q, k, v, learnable_sink=torch.zeros(heads, device="cuda")):
        assert call().shape[-2:] == q.shape[-2:], name
        names.append(name)
    assert len(names) == 6
    for bad, error, match in [(torch.zeros(heads + 1, device="cuda"), ValueError, r"shape \(nheads,\)"),
                              (torch.zeros(heads, dtype=torch.int32, device="cuda"), TypeError, "floating-point"),
                              ([0.0] * heads, TypeError, "must be a tensor"),
                              (torch.zeros(heads), ValueError, "q's device")]:
        with pytest.raises(error, match=match):
            flash_attn_t.flash_attn_func(q, k, v, learnable_sink=bad)


def test_every_entry_point_takes_alibi_slopes(fake_cuda):
    """alibi_slopes, fp32 (nheads,) or (batch, nheads): accepted by every entry point, its rules
    named in the errors."""
    q, k, v = batched(hk=4, device="cuda")
    batch, heads = q.shape[0], q.shape[2]
    for slopes in (torch.ones(heads, device="cuda"), torch.ones(batch, heads, device="cuda")):
        names = []
        for name, call in call_every_entry_point(q, k, v, alibi_slopes=slopes):
            assert call().shape[-2:] == q.shape[-2:], name
            names.append(name)
        assert len(names) == 6
    for bad, error, match in [(torch.ones(heads + 1, device="cuda"), ValueError, r"shape \(nheads,\)"),
                              (torch.ones(batch + 1, heads, device="cuda"), ValueError, r"\(batch, nheads\)"),
                              (torch.ones(heads, dtype=torch.float16, device="cuda"), TypeError, "float32"),
                              ([1.0] * heads, TypeError, "must be a tensor"),
                              (torch.ones(heads), ValueError, "q's device")]:
        with pytest.raises(error, match=match):
            flash_attn_t.flash_attn_func(q, k, v, alibi_slopes=bad)
    k_cache = torch.zeros(batch, 64, k.shape[2], k.shape[3], dtype=k.dtype, device="cuda")
    slopes = torch.ones(heads, device="cuda")
    assert flash_attn_t.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), alibi_slopes=slopes).shape == q.shape


def test_every_entry_point_takes_a_window(fake_cuda):
    if not ops.extension_available():
        pytest.skip("flash_attn_t._C is not built (the fake kernels come with it)")
    q, k, v = batched(hk=4, device="cuda")
    for name, call in call_every_entry_point(q, k, v, causal=True, window_size=(3, 0), softcap=30.0):
        out = call()
        assert out.shape[-2:] == q.shape[-2:], name
    with pytest.raises(ValueError, match="window_size entries"):
        flash_attn_t.flash_attn_func(q, k, v, window_size=(-5, 2))
    for bad, error in ((-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                       (None, TypeError)):
        with pytest.raises(error, match="softcap must be"):
            flash_attn_t.flash_attn_func(q, k, v, softcap=bad)


@pytest.mark.parametrize("feature,kwargs,match", [
    ("dropout", dict(dropout_p=0.1), r"dropout_p=0.1"),
    ("window", dict(window_size=(3, 0)), r"window_size=\(3, 0\)"),
    ("softcap", dict(softcap=5.0), "softcap=5.0"),
    ("alibi", dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
    ("paged_kv", dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
])
def test_a_feature_switched_off_is_refused_naming_its_argument(monkeypatch, feature, kwargs, match):
    monkeypatch.setitem(KERNEL_FEATURES, feature, False)
    with pytest.raises(NotImplementedError, match=match):
        check_unimplemented(**kwargs)


def test_defaults_are_implemented():
    check_unimplemented()
    check_unimplemented(dropout_p=0.0, window_size=[-1, -1], softcap=0.0)


# --- cu_seqlens --------------------------------------------------------------------------------

def test_valid_varlen_passes():
    q, k, _ = varlen()
    check_varlen(q, k, cu([0, 3, 3, 10]), cu([0, 5, 6, 12]), 7, 6)
    check_varlen(q[:0], k[:0], cu([0]), cu([0]), 0, 0)  # an empty batch


@pytest.mark.parametrize("which,offsets,dtype,error,match", [
    ("q", [0, 3, 3, 10], torch.int64, TypeError, "cu_seqlens_q must be int32, got torch.int64"),
    ("k", [[0, 5, 6, 12]], torch.int32, ValueError, r"cu_seqlens_k must be 1-D with batch \+ 1 entries"),
    ("k", [], torch.int32, ValueError, r"cu_seqlens_k must be 1-D with batch \+ 1 entries"),
    ("q", [1, 3, 3, 10], torch.int32, ValueError, r"cu_seqlens_q\[0\] must be 0, got 1"),
    ("q", [0, 4, 3, 10], torch.int32, ValueError, "cu_seqlens_q must be non-decreasing"),
    ("k", [0, 5, 6, 11], torch.int32, ValueError,
     r"cu_seqlens_k\[-1\] \(11\) must equal the number of tokens of its tensor \(12\)"),
    ("k", [0, 5, 6, 13], torch.int32, ValueError, r"cu_seqlens_k\[-1\] \(13\) must equal"),
    ("q", [0, 10], torch.int32, ValueError, r"cu_seqlens_q and cu_seqlens_k must have the same length"),
])
def test_malformed_cu_seqlens(which, offsets, dtype, error, match):
    q, k, _ = varlen()
    cu_q, cu_k = cu([0, 3, 3, 10]), cu([0, 5, 6, 12])
    bad = torch.tensor(offsets, dtype=dtype)
    cu_q, cu_k = (bad, cu_k) if which == "q" else (cu_q, bad)
    with pytest.raises(error, match=match):
        check_varlen(q, k, cu_q, cu_k, 10, 10)


def test_max_seqlen():
    q, k, _ = varlen()
    cu_q, cu_k = cu([0, 3, 3, 10]), cu([0, 5, 6, 12])
    with pytest.raises(ValueError, match=r"max_seqlen_q \(6\) is smaller than the longest sequence in cu_seqlens_q \(7"):
        check_varlen(q, k, cu_q, cu_k, 6, 6)
    with pytest.raises(ValueError, match=r"max_seqlen_k \(5\) is smaller than the longest sequence in cu_seqlens_k \(6"):
        check_varlen(q, k, cu_q, cu_k, 7, 5)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int, got float"):
        check_varlen(q, k, cu_q, cu_k, 7, 6.5)
    with pytest.raises(ValueError, match="max_seqlen_q must be non-negative, got -1"):
        check_cu_seqlens(cu([0]), "cu_seqlens_q", 0, -1, "max_seqlen_q")
    check_varlen(q, k, cu_q, cu_k, torch.tensor(7), 1000)  # larger than needed is fine


# --- flash_attn_with_kvcache ------------------------------------------------------------------

def kvcache_inputs(device="cuda", batch=2, seqlen_q=1, new=1, d=64, cache=(2, 32)):
    q = torch.randn(batch, seqlen_q, 4, d, dtype=torch.bfloat16, device=device)
    k_cache = torch.randn(*cache, 2, d, dtype=torch.bfloat16, device=device)
    k = torch.randn(batch, new, 2, d, dtype=torch.bfloat16, device=device)
    return dict(q=q, k_cache=k_cache, v_cache=torch.randn_like(k_cache), k=k, v=torch.randn_like(k),
                cache_seqlens=torch.zeros(batch, dtype=torch.int32, device=device))


def int32(values, device="cuda"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def test_kvcache_takes_a_block_table(fake_cuda):
    """A paged cache (num_pages, page_size, nheads_k, headdim) with block_table (batch, max_pages):
    the output has q's shape; a page table's capacity bounds the appended keys."""
    args = kvcache_inputs(cache=(5, 16))
    out = flash_attn_t.flash_attn_with_kvcache(**args, block_table=int32([[4, 0], [2, 3]]))
    assert out.shape == args["q"].shape
    with pytest.raises(ValueError, match=r"must lie in \[0, 32\]"):
        flash_attn_t.flash_attn_with_kvcache(**{**args, "cache_seqlens": 32}, block_table=int32([[4, 0], [2, 3]]))


def test_paged_append_matches_a_contiguous_cache():
    """CPU: appending through a block table writes what the same append into a contiguous cache
    writes, page by page (page 16, pages out of order, an append across a page boundary)."""
    from flash_attn_t.interface import _append_to_cache
    torch.manual_seed(0)
    batch, pages_per_seq, page, heads_k, d = 2, 3, 16, 2, 8
    contiguous = torch.randn(batch, pages_per_seq * page, heads_k, d)
    table = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32)
    paged = torch.empty(6, page, heads_k, d)
    paged[table.long()] = contiguous.view(batch, pages_per_seq, page, heads_k, d)
    seqlens = torch.tensor([14, 30], dtype=torch.int32)  # appends cross a page boundary
    q, k_new, v_new = torch.randn(batch, 3, 4, d), torch.randn(batch, 3, heads_k, d), torch.randn(batch, 3, heads_k, d)
    contiguous_v, paged_v = contiguous.clone(), paged.clone()
    _append_to_cache(q, contiguous, contiguous_v, k_new, v_new, seqlens, None, None, True)
    _append_to_cache(q, paged, paged_v, k_new, v_new, seqlens, None, None, True, table)
    assert torch.equal(paged[table.long()].flatten(1, 2), contiguous)
    assert torch.equal(paged_v[table.long()].flatten(1, 2), contiguous_v)


# each change is built inside the fake mode (no GPU needed)
@pytest.mark.parametrize("change,error,match", [
    (lambda: dict(v=None), ValueError, "k and v must be given together"),
    (lambda: dict(cache_seqlens=None), ValueError, "cache_seqlens is required with k and v"),
    (lambda: dict(cache_seqlens=torch.zeros(2, device="cuda")), TypeError, "cache_seqlens must be int32"),
    (lambda: dict(cache_seqlens=int32([0, 0, 0])), ValueError, "cache_seqlens must be 1-D with one entry per"),
    (lambda: dict(cache_seqlens=32), ValueError, r"cache_seqlens \(32\) plus seqlen_new \(1\) must lie in"),
    (lambda: dict(cache_seqlens="3"), TypeError, "cache_seqlens must be an int or an int32 tensor"),
    (lambda: dict(k_cache=torch.zeros(3, 32, 2, 64, dtype=torch.bfloat16, device="cuda")), ValueError,
     "k_cache and v_cache must have the same shape"),
    (lambda: dict(k=torch.zeros(2, 1, 4, 64, dtype=torch.bfloat16, device="cuda")), ValueError,
     "k must have shape"),
    (lambda: dict(k=torch.zeros(2, 33, 2, 64, dtype=torch.bfloat16, device="cuda"),
                  v=torch.zeros(2, 33, 2, 64, dtype=torch.bfloat16, device="cuda")), ValueError,
     "k has 33 new tokens but the cache holds only 32"),
    (lambda: dict(cache_batch_idx=int32([0])), ValueError, "cache_batch_idx must be 1-D"),
    (lambda: dict(cache_leftpad=torch.zeros(2, dtype=torch.int64, device="cuda")), TypeError,
     "cache_leftpad must be int32"),
    (lambda: dict(rotary_cos=torch.ones(40, 32, device="cuda")), ValueError,
     "rotary_cos and rotary_sin must be given together"),
    (lambda: dict(rotary_cos=torch.ones(40, 12, device="cuda"), rotary_sin=torch.ones(40, 12, device="cuda")),
     ValueError, "rotary_dim"),
    (lambda: dict(k=None, v=None, rotary_cos=torch.ones(40, 32, device="cuda"),
                  rotary_sin=torch.ones(40, 32, device="cuda")), ValueError, "rotate q and the new k"),
    (lambda: dict(num_splits=-1), ValueError, "num_splits must be >= 0"),
    (lambda: dict(block_table=torch.zeros(2, 1, dtype=torch.int64, device="cuda")), TypeError,
     "block_table must be int32"),
    (lambda: dict(block_table=int32([[0], [1], [0]])), ValueError, r"block_table must have shape \(batch, max_pages\)"),
    (lambda: dict(block_table=int32([[0], [1]]), k_cache=torch.zeros(2, 24, 2, 64, dtype=torch.bfloat16, device="cuda"),
                  v_cache=torch.zeros(2, 24, 2, 64, dtype=torch.bfloat16, device="cuda")), ValueError,
     "multiple of 16"),
    (lambda: dict(block_table=int32([[0], [1]]), cache_batch_idx=int32([1, 0])), NotImplementedError,
     "cache_batch_idx with block_table"),
    (lambda: dict(block_table=int32([[0], [1]]), cache_leftpad=int32([0, 0])), NotImplementedError,
     "cache_leftpad with block_table"),
    (lambda: dict(window_size=(-3, 0)), ValueError, "window_size entries must be >= -1"),
    (lambda: dict(softcap=-5.0), ValueError, "softcap must be a finite number >= 0"),
])
def test_kvcache_rules(fake_cuda, change, error, match):
    args = {**kvcache_inputs(), **change()}
    with pytest.raises(error, match=match):
        flash_attn_t.flash_attn_with_kvcache(**args)


def test_kvcache_needs_a_matching_cache_batch_or_an_index(fake_cuda):
    args = kvcache_inputs(cache=(3, 32))
    with pytest.raises(ValueError, match=r"k_cache's batch size \(3\) must equal q's \(2\) unless cache_batch_idx"):
        flash_attn_t.flash_attn_with_kvcache(**args)
    if ops.extension_available():
        out = flash_attn_t.flash_attn_with_kvcache(**args, cache_batch_idx=int32([2, 0]))
        assert out.shape == args["q"].shape


def test_kvcache_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="q must be a CUDA tensor, got cpu"):
        flash_attn_t.flash_attn_with_kvcache(**kvcache_inputs(device="cpu"))


@pytest.mark.skipif(not ops.extension_available(), reason="flash_attn_t._C is not built")
def test_kvcache_output_shapes(fake_cuda):
    args = kvcache_inputs(seqlen_q=3, new=3, d=40)  # 40: zero-padded to a kernel head dim and back
    out, lse = flash_attn_t.flash_attn_with_kvcache(**args, causal=True, return_softmax_lse=True)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    no_append = {**args, "k": None, "v": None, "cache_seqlens": 7}
    assert flash_attn_t.flash_attn_with_kvcache(**no_append).shape == args["q"].shape
    split = {**args, "causal": False, "num_splits": 3, "return_softmax_lse": True}  # the split-KV path
    out, lse = flash_attn_t.flash_attn_with_kvcache(**split)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype and lse.shape == (2, 4, 3)


def test_kvcache_signature_matches_flash_attn():
    params = inspect.signature(flash_attn_t.flash_attn_with_kvcache).parameters
    expected = dict(q=inspect.Parameter.empty, k_cache=inspect.Parameter.empty, v_cache=inspect.Parameter.empty,
                    k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                    cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False)
    positional = {p: params[p].default for p in params if params[p].kind != inspect.Parameter.KEYWORD_ONLY}
    assert positional == expected and list(positional) == list(expected)
    extensions = {p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY}
    assert extensions == {"learnable_sink"} and params["learnable_sink"].default is None


# --- the API surface ---------------------------------------------------------------------------

FLASH_ATTN_DEFAULTS = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False)


@pytest.mark.parametrize("name,leading,extra", [
    ("flash_attn_func", ["q", "k", "v"], {}),
    ("flash_attn_qkvpacked_func", ["qkv"], {}),
    ("flash_attn_kvpacked_func", ["q", "kv"], {}),
    ("flash_attn_varlen_func",
     ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"], dict(block_table=None)),
    ("flash_attn_varlen_qkvpacked_func", ["qkv", "cu_seqlens", "max_seqlen"], {}),
    ("flash_attn_varlen_kvpacked_func",
     ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"], {}),
])
def test_signatures_match_flash_attn(name, leading, extra):
    """flash_attn 2.x's parameters, names, order and defaults; beyond them only keyword-only
    extras (learnable_sink, FlashAttention-4's name)."""
    params = inspect.signature(getattr(flash_attn_t, name)).parameters
    expected = {**dict.fromkeys(leading, inspect.Parameter.empty), **FLASH_ATTN_DEFAULTS, **extra}
    compatible = {p: params[p].default for p in params if params[p].kind != inspect.Parameter.KEYWORD_ONLY}
    assert compatible == expected
    assert list(compatible) == list(expected)
    assert {p: params[p].default for p in params if p not in compatible} == {"learnable_sink": None}


def test_version():
    assert flash_attn_t.__version__ == "0.1.0"
