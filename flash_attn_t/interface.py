"""flash_attn 2.x compatible attention functions: argument checks, packing, autograd.

Every entry point runs the check_* functions below before any kernel, in this order: devices
first (so CPU input always reads "must be a CUDA tensor"), then dtypes, shapes, strides, the
features not implemented yet, softmax_scale, and for varlen the cu_seqlens. Bad input gets a
TypeError / ValueError naming the argument and the rule; a feature not implemented yet gets a
NotImplementedError naming the argument.
"""
import math
import operator

import torch

from . import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)  # the head dims the kernels are compiled for
# Every multiple of 8 up to 128 is accepted: the others run zero-padded to the next kernel head
# dim (zeros add nothing to q.k, and the padded output columns are sliced off).
SUPPORTED_HEAD_DIMS = tuple(range(8, KERNEL_HEAD_DIMS[-1] + 1, 8))


# ---------------------------------------------------------------------------------------------
# argument checks, one function per concern


def check_devices(**tensors):
    """Every argument is a CUDA tensor, all on the device of the first one (q, or a packed qkv)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.device.type != "cuda":
            hint = (" (the kernels run on NVIDIA GPUs only; on the CPU, "
                    "flash_attn_t.reference.attention_reference computes the same attention exactly)"
                    if t.device.type == "cpu" else "")
            raise ValueError(f"{name} must be a CUDA tensor, got {t.device.type}{hint}")
    (first, first_t), *rest = tensors.items()
    for name, t in rest:
        if t.device != first_t.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {first_t.device}: "
                             "all inputs must be on one device")


def check_dtypes(q, k, v):
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q.dtype must be torch.float16 or torch.bfloat16, got {q.dtype}"
                        + (" (cast the inputs with .half() or .bfloat16())" if q.is_floating_point() else ""))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must match q.dtype ({q.dtype})")


def check_shapes(q, k, v, *, varlen):
    """Batched: q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim).
    varlen: q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim)."""
    rank, layout = (3, "(total_tokens, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
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
        raise ValueError(f"head dim {head_dim} is not supported: head dims must be multiples of 8 up to "
                         f"{KERNEL_HEAD_DIMS[-1]} (kernels for {KERNEL_HEAD_DIMS}, others run zero-padded)")
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k == 0 or heads % heads_k != 0:
        raise ValueError(f"nheads ({heads}) must be a multiple of nheads_k ({heads_k}) (GQA/MQA)")


def check_strides(q, k, v):
    """The kernels read rows of headdim contiguous elements; other strides may be anything."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")


def check_qkv(q, k, v, *, varlen):
    """All rules on q, k, v except the device ones (check_devices runs first)."""
    check_dtypes(q, k, v)
    check_shapes(q, k, v, varlen=varlen)
    check_strides(q, k, v)


def check_unimplemented(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, block_table=None):
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: dropout is not implemented yet (use dropout_p=0.0)")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(
            f"window_size={tuple(window_size)}: sliding-window attention is not implemented yet (use (-1, -1))")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap={softcap}: logit soft-capping is not implemented yet (use 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not implemented yet (pass None)")
    if block_table is not None:
        raise NotImplementedError("block_table: a paged KV cache is not implemented yet (pass None)")


def check_softmax_scale(softmax_scale, head_dim):
    """Returns the scale as a float: 1 / sqrt(head_dim) when None."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    softmax_scale = float(softmax_scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return softmax_scale


def check_cu_seqlens(cu_seqlens, name, total, max_seqlen, max_name):
    """cu_seqlens: int32, 1-D, batch + 1 offsets starting at 0, non-decreasing, ending at total (the
    token count of its tensor); max_seqlen >= every length. The value rules need one small host
    copy; they are skipped while torch.compile traces, when the values are not known."""
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu_seqlens.shape)}")
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
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] ({offsets[-1]}) must equal the number of tokens of its tensor ({total})")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} ({max(lengths)})")


def check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")


def check_packed_shape(t, name, dim, count, layout):
    """A packed qkv / kv (after check_devices): its dimension `dim` has `count` entries, 3 or 2."""
    if t.dim() != dim + 3 or t.shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# autograd


def _pad_head_dim(*tensors):
    """The tensors (q, k, v, ...) zero-padded along the head dim to the next kernel head dim
    (unchanged if equal)."""
    head_dim = tensors[0].shape[-1]
    target = next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)
    if target == head_dim:
        return tensors
    return tuple(torch.nn.functional.pad(t, (0, target - head_dim)) for t in tensors)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


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
        dq, dk, dv = torch.ops.flash_attn_t.bwd(_last_dim_contiguous(dout), q, k, v, out, lse,
                                                ctx.softmax_scale, ctx.causal, ctx.deterministic)
        return dq, dk, dv, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                deterministic):
        out, lse = torch.ops.flash_attn_t.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k, softmax_scale, causal)
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
            ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None


def _result(out, lse, return_attn_probs):
    # flash_attn returns (out, softmax_lse, S_dmask) here; the attention probabilities are never
    # materialised by these kernels, so the third element is always None.
    return (out, lse, None) if return_attn_probs else out


# ---------------------------------------------------------------------------------------------
# public API (flash_attn 2.x names, argument order and defaults)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Exact attention softmax(q k^T * softmax_scale) v.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), fp16 or bf16
    on one CUDA device, nheads a multiple of nheads_k (GQA/MQA). softmax_scale defaults to
    1 / sqrt(headdim). causal=True with seqlen_q != seqlen_k is aligned bottom-right: query i sees
    keys j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros. deterministic=True
    makes the backward bitwise reproducible.
    Returns out (batch, seqlen_q, nheads, headdim); with return_attn_probs=True, (out, lse, None):
    lse (batch, nheads, seqlen_q) fp32, natural log, +inf for rows that see no key; None stands
    for the attention probabilities, which are never materialised.
    dropout_p, window_size, softcap and alibi_slopes accept only their defaults for now.
    """
    check_devices(q=q, k=k, v=v)
    check_qkv(q, k, v, varlen=False)
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    ops.require_extension()
    head_dim = q.shape[-1]
    out, lse = FlashAttnFunc.apply(*_pad_head_dim(q, k, v), softmax_scale, bool(causal), bool(deterministic))
    return _result(out[..., :head_dim], lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func with qkv: (batch, seqlen, 3, nheads, headdim); its gradient comes back packed."""
    check_devices(qkv=qkv)
    check_packed_shape(qkv, "qkv", 2, 3, "(batch, seqlen, 3, nheads, headdim)")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func with q: (batch, seqlen_q, nheads, headdim), kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    check_devices(q=q, kv=kv)
    check_packed_shape(kv, "kv", 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Exact attention over a packed batch of variable-length sequences.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); sequence i holds the tokens
    cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v
    (int32 offsets of batch + 1 entries); max_seqlen_q / max_seqlen_k bound the lengths. The other
    arguments are those of flash_attn_func; lse (return_attn_probs=True) is (nheads, total_q) fp32.
    """
    check_devices(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    check_qkv(q, k, v, varlen=True)
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes, block_table)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    ops.require_extension()
    head_dim = q.shape[-1]
    out, lse = FlashAttnVarlenFunc.apply(*_pad_head_dim(q, k, v), cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                         int(max_seqlen_k), softmax_scale, bool(causal), bool(deterministic))
    return _result(out[..., :head_dim], lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func with qkv: (total, 3, nheads, headdim) and one cu_seqlens for q and k."""
    check_devices(qkv=qkv)
    check_packed_shape(qkv, "qkv", 1, 3, "(total_tokens, 3, nheads, headdim)")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func with q: (total_q, nheads, headdim), kv: (total_k, 2, nheads_k, headdim)."""
    check_devices(q=q, kv=kv)
    check_packed_shape(kv, "kv", 1, 2, "(total_tokens, 2, nheads_k, headdim)")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
