"""CPU: every bad-input rule raises before any kernel runs, naming the argument and the rule."""
import pytest
import torch

import flash_attn_t
from flash_attn_t.interface import check_qkv, check_unimplemented, check_varlen, check_softmax_scale


def qkv(b=2, sq=8, sk=8, h=4, hk=2, d=64, dtype=torch.bfloat16, device="cpu"):
    return (torch.randn(b, sq, h, d, dtype=dtype, device=device), torch.randn(b, sk, hk, d, dtype=dtype, device=device),
            torch.randn(b, sk, hk, d, dtype=dtype, device=device))


def test_cpu_tensors_are_rejected_by_every_entry_point():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        flash_attn_t.flash_attn_func(q, k, v)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        flash_attn_t.flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        flash_attn_t.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2))
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        flash_attn_t.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
def test_unsupported_dtype(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match=r"q.dtype must be torch.float16 or torch.bfloat16"):
        check_qkv(q, k, v, varlen=False, require_cuda=False)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k.dtype \(torch.float16\) must match q.dtype \(torch.bfloat16\)"):
        check_qkv(q, k.half(), v, varlen=False, require_cuda=False)
    with pytest.raises(TypeError, match=r"v.dtype"):
        check_qkv(q, k, v.half(), varlen=False, require_cuda=False)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        check_qkv(q, k, [1, 2], varlen=False, require_cuda=False)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(batch, seqlen, nheads, headdim\)"):
        check_qkv(q[0], k, v, varlen=False, require_cuda=False)
    with pytest.raises(ValueError, match=r"k must have 3 dimensions \(total_tokens, nheads, headdim\)"):
        check_qkv(q[0], k, v[0], varlen=True, require_cuda=False)


def test_shape_mismatches():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        check_qkv(q, k, v[:, :4], varlen=False, require_cuda=False)
    with pytest.raises(ValueError, match=r"k's batch size \(1\) must equal q's \(2\)"):
        check_qkv(q, k[:1], v[:1], varlen=False, require_cuda=False)
    with pytest.raises(ValueError, match=r"k's head dim \(128\) must equal q's \(64\)"):
        q2, k2, v2 = qkv(d=128)
        check_qkv(q, k2, v2, varlen=False, require_cuda=False)


@pytest.mark.parametrize("d", [8, 32, 80, 96, 256])
def test_unsupported_head_dim(d):
    q, k, v = qkv(d=d)
    with pytest.raises(ValueError, match=rf"head dim {d} is not supported: supported head dims are \(64, 128\)"):
        check_qkv(q, k, v, varlen=False, require_cuda=False)


def test_non_contiguous_last_dim():
    q, k, v = qkv()
    q_strided = torch.randn(2, 8, 4, 128, dtype=torch.bfloat16)[..., ::2]
    assert q_strided.shape == q.shape and q_strided.stride(-1) == 2
    with pytest.raises(ValueError, match=r"q must have a contiguous last dimension \(stride 1\), got stride 2"):
        check_qkv(q_strided, k, v, varlen=False, require_cuda=False)


def test_heads_not_a_multiple_of_kv_heads():
    q, k, v = qkv(h=6, hk=4)
    with pytest.raises(ValueError, match=r"nheads \(6\) must be a multiple of nheads_k \(4\)"):
        check_qkv(q, k, v, varlen=False, require_cuda=False)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_softmax_scale(scale):
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
        check_softmax_scale(scale, 64)


def test_default_softmax_scale():
    assert check_softmax_scale(None, 64) == pytest.approx(0.125)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dropout_p=0.1), "dropout_p"),
        (dict(window_size=(128, 0)), "window_size"),
        (dict(softcap=30.0), "softcap"),
        (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
        (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
    ],
)
def test_unimplemented_arguments(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        check_unimplemented(**kwargs)


def varlen_inputs():
    q = torch.randn(10, 4, 64, dtype=torch.float16)
    k = torch.randn(12, 2, 64, dtype=torch.float16)
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    return q, k, cu_q, cu_k


def test_valid_varlen_passes():
    q, k, cu_q, cu_k = varlen_inputs()
    check_varlen(q, k, cu_q, cu_k, 7, 6, require_cuda=False)


@pytest.mark.parametrize(
    "which,cu,error,match",
    [
        ("q", torch.tensor([0, 3, 3, 10], dtype=torch.int64), TypeError, "cu_seqlens_q must be int32"),
        ("k", torch.tensor([[0, 5, 6, 12]], dtype=torch.int32), ValueError, "cu_seqlens_k must be 1-D"),
        ("q", torch.tensor([1, 3, 3, 10], dtype=torch.int32), ValueError, r"cu_seqlens_q\[0\] must be 0"),
        ("q", torch.tensor([0, 4, 3, 10], dtype=torch.int32), ValueError, "cu_seqlens_q must be non-decreasing"),
        ("k", torch.tensor([0, 5, 6, 11], dtype=torch.int32), ValueError,
         r"cu_seqlens_k\[-1\] \(11\) must equal the number of tokens of its tensor \(12\)"),
        ("k", torch.tensor([0, 5, 6, 13], dtype=torch.int32), ValueError, r"cu_seqlens_k\[-1\] \(13\)"),
        ("q", torch.tensor([0, 10], dtype=torch.int32), ValueError,
         "cu_seqlens_q and cu_seqlens_k must have the same length"),
    ],
)
def test_malformed_cu_seqlens(which, cu, error, match):
    q, k, cu_q, cu_k = varlen_inputs()
    if which == "q":
        cu_q = cu
    else:
        cu_k = cu
    with pytest.raises(error, match=match):
        check_varlen(q, k, cu_q, cu_k, 10, 10, require_cuda=False)


def test_max_seqlen_too_small():
    q, k, cu_q, cu_k = varlen_inputs()
    with pytest.raises(ValueError, match=r"max_seqlen_q \(6\) is smaller than the longest sequence in cu_seqlens_q \(7\)"):
        check_varlen(q, k, cu_q, cu_k, 6, 6, require_cuda=False)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        check_varlen(q, k, cu_q, cu_k, 7, 6.5, require_cuda=False)


def test_packed_shapes():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_t.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        flash_attn_t.flash_attn_kvpacked_func(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 3, 2, 64))


def test_public_api_matches_flash_attn_signatures():
    import inspect

    sig = inspect.signature(flash_attn_t.flash_attn_func)
    assert list(sig.parameters) == ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                                    "alibi_slopes", "deterministic", "return_attn_probs"]
    assert sig.parameters["window_size"].default == (-1, -1) and sig.parameters["causal"].default is False
    varlen = inspect.signature(flash_attn_t.flash_attn_varlen_func)
    assert list(varlen.parameters)[:7] == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                           "max_seqlen_k"]
