"""flash_attn 2.x compatible attention functions: argument checks, packing, autograd.

Every entry point checks its arguments (check_* below) before any kernel runs, so bad input gets
a ValueError / TypeError that names the argument and the rule, and features not implemented yet
get a NotImplementedError naming the argument.
"""
import math
import operator

import torch

from . import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)


# ---------------------------------------------------------------------------------------------
# argument checks


def check_unimplemented(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, block_table=None):
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: dropout is not implemented yet (use dropout_p=0.0)")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(
            f"window_size={tuple(window_size)}: sliding-window attention is not implemented yet (use (-1, -1))"
        )
    if softcap != 0.0:
        raise NotImplementedError(f"softcap={softcap}: logit soft-capping is not implemented yet (use 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not implemented yet (pass None)")
    if block_table is not None:
        raise NotImplementedError("block_table: a paged KV cache is not implemented yet (pass None)")


def check_qkv(q, k, v, *, varlen, require_cuda=True):
    """The rules every q, k, v must follow. varlen: (total, heads, dim), else (batch, seq, heads, dim).
    require_cuda=False skips only the device rules (the CPU test suite checks the others)."""
    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if require_cuda:
        for name, t in zip(names, (q, k, v)):
            if t.device.type != "cuda":
                raise ValueError(f"{name} must be a CUDA tensor, got a tensor on '{t.device}'")
        for name, t in zip(names[1:], (k, v)):
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must be on one device")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q.dtype must be torch.float16 or torch.bfloat16, got {q.dtype}")
    for name, t in zip(names[1:], (k, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must match q.dtype ({q.dtype})")
    rank, layout = (3, "(total_tokens, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    for name, t in zip(names, (q, k, v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k's batch size ({k.shape[0]}) must equal q's ({q.shape[0]})")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's head dim ({k.shape[-1]}) must equal q's ({head_dim})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported: supported head dims are {SUPPORTED_HEAD_DIMS}")
    for name, t in zip(names, (q, k, v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k == 0 or heads % heads_k != 0:
        raise ValueError(f"nheads ({heads}) must be a multiple of nheads_k ({heads_k}) (GQA/MQA)")


def check_softmax_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    softmax_scale = float(softmax_scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return softmax_scale


def check_cu_seqlens(cu_seqlens, name, total, max_seqlen, max_name, device, require_cuda=True):
    """cu_seqlens: int32, 1-D, on q's device, starting at 0, non-decreasing, ending at the token
    count of its tensor; max_seqlen >= every length. The value rules need one small host copy,
    skipped while torch.compile traces (the values are not known then)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if require_cuda and cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
    try:
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}") from None
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be non-negative, got {max_seqlen}")
    if torch.compiler.is_compiling():
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] ({offsets[-1]}) must equal the number of tokens of its tensor ({total})")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} ({max(lengths)})")


def check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, require_cuda=True):
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q.device, require_cuda)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q.device, require_cuda)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
            f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# autograd


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, deterministic):
        out, lse = torch.ops.flash_attn_t.fwd(q, k, v, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal, ctx.deterministic = softmax_scale, causal, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.flash_attn_t.bwd(
            _last_dim_contiguous(dout), q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic
        )
        return dq, dk, dv, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                deterministic):
        out, lse = torch.ops.flash_attn_t.varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
        ctx.softmax_scale, ctx.causal, ctx.deterministic = softmax_scale, causal, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.flash_attn_t.varlen_bwd(
            _last_dim_contiguous(dout), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
            ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal, ctx.deterministic
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def _result(out, lse, return_attn_probs):
    # flash_attn returns (out, softmax_lse, S_dmask); the probabilities are never materialised here.
    return (out, lse, None) if return_attn_probs else out


# ---------------------------------------------------------------------------------------------
# public API (flash_attn 2.x names, argument order and defaults)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Exact attention. q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
    Returns out like q; with return_attn_probs=True, (out, lse, None), lse (batch, nheads, seqlen_q) fp32."""
    check_qkv(q, k, v, varlen=False)
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    ops.require_extension()
    out, lse = FlashAttnFunc.apply(q, k, v, softmax_scale, bool(causal), bool(deterministic))
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: (batch, seqlen, 3, nheads, headdim). The gradient arrives packed the same way."""
    _check_packed(qkv, "qkv", 5, 3, "(batch, seqlen, 3, nheads, headdim)")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    _check_packed(kv, "kv", 5, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed variable-length batch. q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim);
    cu_seqlens_*: int32 (batch + 1,) offsets. lse (with return_attn_probs=True): (nheads, total_q) fp32."""
    check_qkv(q, k, v, varlen=True)
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes, block_table)
    check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    ops.require_extension()
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                         int(max_seqlen_k), softmax_scale, bool(causal), bool(deterministic))
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: (total, 3, nheads, headdim)."""
    _check_packed(qkv, "qkv", 4, 3, "(total_tokens, 3, nheads, headdim)")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim)."""
    _check_packed(kv, "kv", 4, 2, "(total_tokens, 2, nheads_k, headdim)")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _check_packed(t, name, rank, count, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank or t.shape[rank - 3] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
