"""flash_attn 2.x compatible attention functions: argument checks, packing, autograd.

Every entry point runs the check_* functions below before any kernel, in this order: devices
first (so CPU input always reads "must be a CUDA tensor"), then dtypes, shapes, strides, the
features not implemented yet, softmax_scale, and for varlen the cu_seqlens. Bad input gets a
TypeError / ValueError naming the argument and the rule; a feature not implemented yet gets a
NotImplementedError naming the argument.
"""
import math
import operator
import os

import torch

from . import decode, ops, sinks
from .rotary import apply_rotary

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# The head dims the kernels are compiled for (both families, fp16 and bf16).
KERNEL_HEAD_DIMS = (64, 128, 256)
# Every head dim from 1 to 256 is accepted: the others run zero-padded to the next kernel head
# dim (zeros add nothing to q.k, and the padded output columns are sliced off; the default
# softmax scale stays 1 / sqrt of the given head dim).
SUPPORTED_HEAD_DIMS = range(1, KERNEL_HEAD_DIMS[-1] + 1)  # (a range: `in` is one comparison, not a scan)


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
    rank = 3 if varlen else 4
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        layout = "(total_tokens, nheads, headdim)" if varlen else "(batch, seqlen, nheads, headdim)"
        name, t = next((name, t) for name, t in (("q", q), ("k", k), ("v", v)) if t.dim() != rank)
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k's batch size ({k.shape[0]}) must equal q's ({q.shape[0]})")
    check_heads(q, k)


def check_heads(q, k, k_name="k"):
    """q's and k's head dims agree and are supported; nheads is a multiple of nheads_k."""
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{k_name}'s head dim ({k.shape[-1]}) must equal q's ({head_dim})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported: head dims must lie in [1, {KERNEL_HEAD_DIMS[-1]}] "
                         f"(kernels for {KERNEL_HEAD_DIMS}, others run zero-padded)")
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k == 0 or heads % heads_k != 0:
        raise ValueError(f"nheads ({heads}) must be a multiple of nheads_k ({heads_k}) (GQA/MQA)")


def check_strides(q, k, v, names=("q", "k", "v")):
    """The kernels read rows of headdim contiguous elements; other strides may be anything."""
    if q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1:
        return
    for name, t in zip(names, (q, k, v)):
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got stride {t.stride(-1)}")


def check_qkv(q, k, v, *, varlen):
    """All rules on q, k, v except the device ones (check_devices runs first)."""
    check_dtypes(q, k, v)
    check_shapes(q, k, v, varlen=varlen)
    check_strides(q, k, v)


# What the kernels implement beyond plain (causal or not) attention: the one table that the
# argument checks below and the transformers integration's fallback decision both read. A feature
# lands by adding its kernels and tests and turning its entry on.
KERNEL_FEATURES = {
    "dropout": True,      # dropout_p > 0
    "window": True,       # window_size != (-1, -1); transformers' sliding_window
    "softcap": True,      # softcap > 0
    "alibi": True,        # alibi_slopes
    "paged_kv": True,     # block_table
    "sinks": True,        # learnable_sink: a sink logit per head (transformers' s_aux)
}


_UNIMPLEMENTED = {
    "dropout": "dropout_p={dropout_p}: dropout is not implemented yet (use dropout_p=0.0)",
    "window": "window_size={window_size}: sliding-window attention is not implemented yet (use (-1, -1))",
    "softcap": "softcap={softcap}: logit soft-capping is not implemented yet (use 0.0)",
    "alibi": "alibi_slopes: ALiBi is not implemented yet (pass None)",
    "paged_kv": "block_table: a paged KV cache is not implemented yet (pass None)",
}


def check_unimplemented(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, block_table=None):
    # (messages formatted only when raised: this runs on every decode call)
    asked = (("dropout", dropout_p != 0.0), ("window", tuple(window_size) != (-1, -1)), ("softcap", softcap != 0.0),
             ("alibi", alibi_slopes is not None), ("paged_kv", block_table is not None))
    for feature, wanted in asked:
        if wanted and not KERNEL_FEATURES[feature]:
            raise NotImplementedError(_UNIMPLEMENTED[feature].format(dropout_p=dropout_p,
                                                                      window_size=tuple(window_size), softcap=softcap))


def check_window_size(window_size):
    """window_size: flash_attn's (left, right) key window around each query's position, -1 for an
    unbounded edge. Returns it as a tuple of two ints."""
    try:
        left, right = (operator.index(x) for x in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {(left, right)}")
    return left, right


def check_softcap(softcap):
    """softcap: scores become softcap * tanh(score / softcap); 0 (the default) for none. Returns a
    float."""
    try:
        softcap = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a number, got {softcap!r}") from None
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no soft-capping), got {softcap}")
    return softcap


def check_alibi_slopes(alibi_slopes, q, batch, heads):
    """alibi_slopes: None, or fp32 (nheads,) or (batch, nheads) on q's device (flash_attn's rule);
    returns it contiguous."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = "
                         f"({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device ({q.device}), got {alibi_slopes.device}")
    return alibi_slopes.detach().contiguous()


def check_dropout_p(dropout_p):
    """dropout_p: the probability of zeroing each attention probability, in [0, 1) (kept ones are
    scaled by 1 / (1 - dropout_p)). Returns a float."""
    try:
        dropout_p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"dropout_p must be a number, got {dropout_p!r}") from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return dropout_p


def check_learnable_sink(learnable_sink, q, heads):
    """learnable_sink: None, or a floating-point tensor (nheads,) on q's device: one logit per
    query head that joins the softmax normaliser and carries no value (gpt-oss)."""
    if learnable_sink is None:
        return
    if not isinstance(learnable_sink, torch.Tensor):
        raise TypeError(f"learnable_sink must be a tensor (nheads,) or None, got {type(learnable_sink).__name__}")
    if not learnable_sink.is_floating_point():
        raise TypeError(f"learnable_sink must be a floating-point tensor (fp32 recommended), "
                        f"got {learnable_sink.dtype}")
    if tuple(learnable_sink.shape) != (heads,):
        raise ValueError(f"learnable_sink must have shape (nheads,) = ({heads},), got {tuple(learnable_sink.shape)}")
    if learnable_sink.device != q.device:
        raise ValueError(f"learnable_sink must be on q's device ({q.device}), got {learnable_sink.device}")


def check_softmax_scale(softmax_scale, head_dim):
    """Returns the scale as a float: 1 / sqrt(head_dim) when None."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    softmax_scale = float(softmax_scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return softmax_scale


def check_cu_seqlens(cu_seqlens, name, total, max_seqlen, max_name, capacity=None):
    """cu_seqlens: int32, 1-D, batch + 1 offsets starting at 0, non-decreasing, ending at total (the
    token count of its tensor; with capacity instead, a paged K/V's keys per sequence, every length
    at most that); max_seqlen >= every length. The value rules read the offsets on
    the host: free for a CPU tensor, a synchronisation for a GPU one, so there they run only when
    checking_values() (the kernels clamp every offset into its tensor, so malformed values never
    make them read or write out of bounds; the varlen calls stay capturable in CUDA graphs)."""
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
    if torch.compiler.is_compiling() or (cu_seqlens.device.type != "cpu" and not checking_values()):
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if capacity is None and offsets[-1] != total:
        raise ValueError(f"{name}[-1] ({offsets[-1]}) must equal the number of tokens of its tensor ({total})")
    if capacity is not None and lengths and max(lengths) > capacity:
        raise ValueError(f"{name}: a sequence of {max(lengths)} keys exceeds its pages (block_table's max_pages x "
                         f"page_size = {capacity})")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} ({max(lengths)})")


def check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, capacity=None):
    """The cu_seqlens pair; capacity: k is paged with that many keys per sequence (check_block_table)."""
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", capacity)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")


def check_packed_shape(t, name, dim, count, layout):
    """A packed qkv / kv (after check_devices): its dimension `dim` has `count` entries, 3 or 2."""
    if t.dim() != dim + 3 or t.shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def checking_values():
    """Whether value rules that need a host copy (a sync) run on tensors that the kernels only
    clamp into range otherwise: FLASH_ATTN_T_CHECK_VALUES=1 (for debugging; off in CUDA graphs)."""
    return os.environ.get("FLASH_ATTN_T_CHECK_VALUES") == "1" and not torch.compiler.is_compiling()


def check_index_tensor(t, name, batch):
    """A per-sequence int32 index: 1-D of the batch size."""
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be 1-D with one entry per sequence ({batch}), got shape {tuple(t.shape)}")


def check_block_table(block_table, batch, device, k_cache, cache_batch_idx=None, cache_leftpad=None):
    """block_table: None, or int32 (batch, max_pages) on q's device naming each sequence's pages of
    the paged caches (num_pages, page_size, nheads_k, headdim), page_size a multiple of 16.
    Returns the sequences' capacity in keys (max_pages x page_size), or None when not paged."""
    if block_table is None:
        return None
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 tensor or None, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch, max_pages) with batch = {batch}, got "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on q's device ({device}), got {block_table.device}")
    page_size = k_cache.shape[1]
    if page_size % 16 != 0:
        raise ValueError(f"the paged cache's page size (k_cache.shape[1] = {page_size}) must be a multiple of 16")
    if cache_batch_idx is not None:
        raise NotImplementedError("cache_batch_idx with block_table: the block table already maps each sequence "
                                  "to its pages")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad with block_table is not implemented yet")
    pages = k_cache.shape[0]
    if checking_values() and block_table.numel() and not 0 <= block_table.min() <= block_table.max() < pages:
        raise ValueError(f"block_table values must lie in [0, {pages}) (the number of pages)")
    return block_table.shape[1] * page_size


def _paged_rows(block_table, positions, page_size, num_pages):
    """(page, offset) long index tensors of the paged caches for positions (batch, n) of each
    sequence, clamped into the caches (no host check)."""
    slot = (positions // page_size).clamp(0, block_table.shape[1] - 1).long()
    return block_table.gather(1, slot).clamp(0, num_pages - 1).long(), (positions % page_size).long()


def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, capacity=None):
    """q (batch, seqlen_q, nheads, headdim); k_cache, v_cache (batch_cache, seqlen_cache, nheads_k,
    headdim), or paged (num_pages, page_size, nheads_k, headdim) with capacity (check_block_table)
    keys per sequence; the new k, v (batch, seqlen_new, nheads_k, headdim); the index tensors int32
    (batch,). Returns cache_seqlens as an int32 tensor (batch,) on q's device, or None."""
    check_dtypes(q, k_cache, v_cache)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, nheads, headdim), got shape "
                             f"{tuple(t.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch, batch_cache = q.shape[0], k_cache.shape[0]
    seqlen_cache = k_cache.shape[1] if capacity is None else capacity
    if capacity is None and cache_batch_idx is None and batch_cache != batch:
        raise ValueError(f"k_cache's batch size ({batch_cache}) must equal q's ({batch}) unless cache_batch_idx "
                         "selects its rows")
    if batch_cache == 0 and batch > 0:
        raise ValueError("k_cache has no rows (batch_cache = 0) for a non-empty batch")
    check_heads(q, k_cache, "k_cache")
    check_strides(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    seqlen_new = _check_new_kv(q, k_cache, k, v, cache_seqlens, seqlen_cache)
    if cache_batch_idx is not None:
        check_index_tensor(cache_batch_idx, "cache_batch_idx", batch)
        if checking_values() and batch and not 0 <= cache_batch_idx.min() <= cache_batch_idx.max() < batch_cache:
            raise ValueError(f"cache_batch_idx values must lie in [0, {batch_cache})")
    seqlens = _cache_seqlens(cache_seqlens, batch, seqlen_cache, seqlen_new, q.device)
    if cache_leftpad is not None:
        check_index_tensor(cache_leftpad, "cache_leftpad", batch)
        if checking_values() and batch and not (0 <= cache_leftpad.min() and
                                                (seqlens is None or bool((cache_leftpad <= seqlens).all()))):
            raise ValueError("cache_leftpad values must lie in [0, cache_seqlens]")
    return seqlens


def _check_new_kv(q, k_cache, k, v, cache_seqlens, seqlen_cache):
    """The new keys and values (None or both (batch, seqlen_new, nheads_k, headdim)): their seqlen_new."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append) or both be None")
    if k is None:
        return 0
    check_dtypes(q, k, v)
    expected = (q.shape[0], k.shape[1] if k.dim() == 4 else -1, *k_cache.shape[2:])
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = {expected}, got "
                             f"{tuple(t.shape)}")
    check_strides(q, k, v)
    if k.shape[1] > seqlen_cache:
        raise ValueError(f"k has {k.shape[1]} new tokens but the cache holds only {seqlen_cache}")
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required with k and v: it says where each sequence's new keys go")
    return k.shape[1]


def _cache_seqlens(cache_seqlens, batch, seqlen_cache, seqlen_new, device):
    """cache_seqlens (None, an int or an int32 tensor) checked, as an int32 tensor (batch,) or None."""
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, torch.Tensor):
        check_index_tensor(cache_seqlens, "cache_seqlens", batch)
        if checking_values() and batch and not (0 <= cache_seqlens.min() and
                                                cache_seqlens.max() + seqlen_new <= seqlen_cache):
            raise ValueError(f"cache_seqlens values plus seqlen_new ({seqlen_new}) must lie in [0, {seqlen_cache}]")
        return cache_seqlens.contiguous()
    try:
        n = operator.index(cache_seqlens)
    except TypeError:
        raise TypeError("cache_seqlens must be an int or an int32 tensor, got "
                        f"{type(cache_seqlens).__name__}") from None
    if not 0 <= n <= seqlen_cache - seqlen_new:
        raise ValueError(f"cache_seqlens ({n}) plus seqlen_new ({seqlen_new}) must lie in [0, {seqlen_cache}] "
                         "(the cache's length)")
    return torch.full((batch,), n, dtype=torch.int32, device=device)


def check_num_splits(num_splits):
    try:
        if operator.index(num_splits) < 0:
            raise ValueError(f"num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    except TypeError:
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}") from None


def check_rotary(rotary_cos, rotary_sin, head_dim, has_new_keys):
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is None:
        return
    if not has_new_keys:
        raise ValueError("rotary_cos / rotary_sin rotate q and the new k: pass k and v with them")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D float tensor (seqlen_ro, rotary_dim / 2), got "
                             f"{t.dtype} {tuple(t.shape)}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} and "
                         f"{tuple(rotary_sin.shape)}")
    rotary_dim = 2 * rotary_cos.shape[1]
    if rotary_dim % 16 != 0 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim (2 x rotary_cos.shape[1] = {rotary_dim}) must be a positive multiple of 16 "
                         f"no larger than the head dim ({head_dim})")


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


def _unpad_head_dim(out, head_dim):
    """The kernels' output cut back to the caller's head dim (itself when that had a kernel)."""
    return out if out.shape[-1] == head_dim else out[..., :head_dim]


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_sink(sink):
    """learnable_sink as the kernels take it: fp32, contiguous (the autograd graph keeps the
    caller's tensor)."""
    return None if sink is None else sink.detach().to(torch.float32).contiguous()


def _grad_needed(*tensors):
    """Whether autograd records this call: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rng_state(q, dropout_p):
    """The int64 (2,) tensor into which a dropout forward writes its (seed, offset), for the
    backward to draw the same mask; None without dropout."""
    return torch.empty(2, dtype=torch.int64, device=q.device) if dropout_p else None


def _forward(q, k, v, softmax_scale, causal, variant, sink, alibi, dropout_p=0.0, rng_state=None):
    """The forward kernels for batched q, k, v: split-KV with the query heads of a kv head packed
    into rows when the queries are few and the keys many (decode.plan; not with ALiBi, whose bias
    follows each row's head and position, nor with dropout), the plain kernel otherwise. Either
    way (out, lse), which is all the backward needs (with rng_state, for dropout). variant:
    (window_left, window_right, softcap), the ops' trailing arguments. The plain kernel adds the
    sink in its epilogue; the split path adds it to the merged rows."""
    splits = decode.plan(q, k, causal, variant[:2]) if alibi is None and not dropout_p else 0
    if splits:  # every key of k is valid: no seqused_k
        out, lse = decode.split_kv_attention(q, k, v, None, None, None, softmax_scale, splits, softcap=variant[2])
        return sinks.apply_sink(out, lse, sink) if sink is not None else (out, lse)
    return torch.ops.flash_attn_t.fwd(q, k, v, softmax_scale, causal, *variant, alibi_slopes=alibi,
                                      learnable_sink=_kernel_sink(sink), dropout_p=dropout_p, rng_state=rng_state)


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, variant, deterministic, sink, alibi, dropout_p=0.0):
        rng_state = _rng_state(q, dropout_p)
        out, lse = _forward(q, k, v, softmax_scale, causal, variant, sink, alibi, dropout_p, rng_state)
        ctx.save_for_backward(q, k, v, out, lse, sink, alibi, rng_state)
        ctx.softmax_scale, ctx.causal, ctx.variant, ctx.deterministic = softmax_scale, causal, variant, deterministic
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sink, alibi, rng_state = ctx.saved_tensors
        dq, dk, dv, dsum = torch.ops.flash_attn_t.bwd(_last_dim_contiguous(dout), q, k, v, out, lse,
                                                      ctx.softmax_scale, ctx.causal, ctx.deterministic, *ctx.variant,
                                                      alibi_slopes=alibi, dropout_p=ctx.dropout_p, rng_state=rng_state)
        dsink = sinks.sink_grad(dsum, lse, sink) if sink is not None and ctx.needs_input_grad[7] else None
        return dq, dk, dv, None, None, None, None, dsink, None, None


def _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, variant,
                    sink, alibi, dropout_p=0.0, rng_state=None):
    """The varlen forward kernel: (out, lse), which is all the backward needs (with rng_state, for
    dropout)."""
    return torch.ops.flash_attn_t.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             softmax_scale, causal, *variant, alibi_slopes=alibi,
                                             learnable_sink=_kernel_sink(sink), dropout_p=dropout_p,
                                             rng_state=rng_state)


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, variant,
                deterministic, sink, alibi, dropout_p=0.0):
        rng_state = _rng_state(q, dropout_p)
        out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   causal, variant, sink, alibi, dropout_p, rng_state)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sink, alibi, rng_state)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
        ctx.softmax_scale, ctx.causal, ctx.variant, ctx.deterministic = softmax_scale, causal, variant, deterministic
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sink, alibi, rng_state = ctx.saved_tensors
        dq, dk, dv, dsum = torch.ops.flash_attn_t.varlen_bwd(
            _last_dim_contiguous(dout), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q,
            ctx.max_seqlen_k, ctx.softmax_scale, ctx.causal, ctx.deterministic, *ctx.variant, alibi_slopes=alibi,
            dropout_p=ctx.dropout_p, rng_state=rng_state)
        dsink = sinks.sink_grad(dsum, lse, sink) if sink is not None and ctx.needs_input_grad[11] else None
        return dq, dk, dv, None, None, None, None, None, None, None, None, dsink, None, None


def _result(out, lse, return_attn_probs):
    # flash_attn returns (out, softmax_lse, S_dmask) here; the attention probabilities are never
    # materialised by these kernels, so the third element is always None.
    return (out, lse, None) if return_attn_probs else out


# ---------------------------------------------------------------------------------------------
# public API (flash_attn 2.x names, argument order and defaults)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, learnable_sink=None):
    """Exact attention softmax(q k^T * softmax_scale) v.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), fp16 or bf16
    on one CUDA device, nheads a multiple of nheads_k (GQA/MQA). softmax_scale defaults to
    1 / sqrt(headdim). causal=True with seqlen_q != seqlen_k is aligned bottom-right: query i sees
    keys j <= i + seqlen_k - seqlen_q; a query that sees no key outputs zeros. window_size=(left,
    right) keeps keys [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right] (-1: no
    bound; with causal, right is 0), and the kernels never load the key blocks outside it.
    softcap > 0 turns each scaled score x into softcap * tanh(x / softcap) before the softmax
    (Gemma 2), with its exact derivative in the backward. alibi_slopes, fp32 (nheads,) or (batch,
    nheads), adds -slope * |i + seqlen_k - seqlen_q - j| to the scaled score of query i and key j
    (ALiBi, as flash_attn, applied after softcap). dropout_p in [0, 1) zeroes each attention
    probability with that probability and scales the kept ones by 1 / (1 - dropout_p) (flash_attn's
    dropout, lse unchanged); the mask comes from torch's CUDA
    generator (torch.manual_seed reproduces it; CUDA-graph safe) and the backward redraws the same.
    Pass dropout_p=0.0 for evaluation, as with flash_attn.
    deterministic=True makes the backward bitwise reproducible. learnable_sink (nheads,) adds a
    logit per head to each row's softmax normaliser that carries no value (gpt-oss's attention
    sinks; FlashAttention-4's keyword); its gradient flows back like q's.
    Returns out (batch, seqlen_q, nheads, headdim); with return_attn_probs=True, (out, lse, None):
    lse (batch, nheads, seqlen_q) fp32, natural log, +inf for rows that see no key; None stands
    for the attention probabilities, which are never materialised.
    """
    check_devices(q=q, k=k, v=v)
    check_qkv(q, k, v, varlen=False)
    window_size = check_window_size(window_size)
    softcap = check_softcap(softcap)
    dropout_p = check_dropout_p(dropout_p)
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    alibi_slopes = check_alibi_slopes(alibi_slopes, q, q.shape[0], q.shape[2])
    check_learnable_sink(learnable_sink, q, q.shape[2])
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    ops.require_extension()
    head_dim = q.shape[-1]
    q_, k_, v_ = _pad_head_dim(q, k, v)
    if _grad_needed(q, k, v, learnable_sink):
        out, lse = FlashAttnFunc.apply(q_, k_, v_, softmax_scale, bool(causal), (*window_size, softcap),
                                       bool(deterministic), learnable_sink, alibi_slopes, dropout_p)
    else:  # inference: no autograd.Function (its bookkeeping was ~15% of a decode call's host time)
        out, lse = _forward(q_, k_, v_, softmax_scale, bool(causal), (*window_size, softcap), learnable_sink,
                            alibi_slopes, dropout_p, _rng_state(q, dropout_p))
    return _result(_unpad_head_dim(out, head_dim), lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              *, learnable_sink=None):
    """flash_attn_func with qkv: (batch, seqlen, 3, nheads, headdim); its gradient comes back packed."""
    check_devices(qkv=qkv)
    check_packed_shape(qkv, "qkv", 2, 3, "(batch, seqlen, 3, nheads, headdim)")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, learnable_sink=learnable_sink)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             *, learnable_sink=None):
    """flash_attn_func with q: (batch, seqlen_q, nheads, headdim), kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    check_devices(q=q, kv=kv)
    check_packed_shape(kv, "kv", 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, learnable_sink=learnable_sink)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, learnable_sink=None):
    """Exact attention over a packed batch of variable-length sequences.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); sequence i holds the tokens
    cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q and cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v
    (int32 offsets of batch + 1 entries); max_seqlen_q / max_seqlen_k bound the lengths. The other
    arguments are those of flash_attn_func; lse (return_attn_probs=True) is (nheads, total_q) fp32.
    block_table (batch, max_pages) int32: a paged prefill (forward only, as in flash_attn): k and v
    are pools of pages (num_pages, page_size, nheads_k, headdim), page_size a multiple of 16, and
    sequence i's keys are the first cu_seqlens_k[i + 1] - cu_seqlens_k[i] rows of the pages
    block_table[i] names, in order.
    """
    check_devices(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if block_table is not None:
        return _paged_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                              softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                              block_table, learnable_sink)
    check_qkv(q, k, v, varlen=True)
    window_size = check_window_size(window_size)
    softcap = check_softcap(softcap)
    dropout_p = check_dropout_p(dropout_p)
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    alibi_slopes = check_alibi_slopes(alibi_slopes, q, cu_seqlens_q.shape[0] - 1, q.shape[1])
    check_learnable_sink(learnable_sink, q, q.shape[1])
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    ops.require_extension()
    head_dim = q.shape[-1]
    q_, k_, v_ = _pad_head_dim(q, k, v)
    if _grad_needed(q, k, v, learnable_sink):
        out, lse = FlashAttnVarlenFunc.apply(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                             int(max_seqlen_k), softmax_scale, bool(causal), (*window_size, softcap),
                                             bool(deterministic), learnable_sink, alibi_slopes, dropout_p)
    else:  # inference: no autograd.Function (as flash_attn_func)
        out, lse = _varlen_forward(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   softmax_scale, bool(causal), (*window_size, softcap), learnable_sink, alibi_slopes,
                                   dropout_p, _rng_state(q, dropout_p))
    return _result(_unpad_head_dim(out, head_dim), lse, return_attn_probs)


def _paged_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs, block_table, learnable_sink):
    """flash_attn_varlen_func with block_table: k, v are pools of pages (num_pages, page_size,
    nheads_k, headdim) and sequence i's cu_seqlens_k[i + 1] - cu_seqlens_k[i] keys lie in the pages
    block_table[i] names, in order. Forward only, as in flash_attn."""
    check_dtypes(q, k, v)
    if q.dim() != 3:
        raise ValueError(f"q must have 3 dimensions (total_tokens, nheads, headdim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be a pool of pages (num_pages, page_size, nheads_k, "
                             f"headdim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_heads(q, k)
    check_strides(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("block_table (a paged prefill) is forward only, as in flash_attn: call it under "
                                  "torch.no_grad() or with tensors that do not require grad")
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    batch = cu_seqlens_q.shape[0] - 1
    capacity = check_block_table(block_table, batch, q.device, k)
    window_size = check_window_size(window_size)
    softcap = check_softcap(softcap)
    if check_dropout_p(dropout_p):
        raise NotImplementedError("dropout_p > 0 with block_table (a paged prefill) is not implemented: a paged "
                                  "prefill is an inference call (pass dropout_p=0.0)")
    check_unimplemented(dropout_p, window_size, softcap, alibi_slopes)
    alibi_slopes = check_alibi_slopes(alibi_slopes, q, batch, q.shape[1])
    check_learnable_sink(learnable_sink, q, q.shape[1])
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, capacity)
    ops.require_extension()
    head_dim = q.shape[-1]
    q_, k_, v_ = _pad_head_dim(q, k, v)
    out, lse = torch.ops.flash_attn_t.varlen_fwd(
        q_, k_, v_, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), softmax_scale, bool(causal),
        *window_size, softcap, alibi_slopes=alibi_slopes, learnable_sink=_kernel_sink(learnable_sink),
        block_table=block_table)
    return _result(_unpad_head_dim(out, head_dim), lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, learnable_sink=None):
    """flash_attn_varlen_func with qkv: (total, 3, nheads, headdim) and one cu_seqlens for q and k."""
    check_devices(qkv=qkv)
    check_packed_shape(qkv, "qkv", 1, 3, "(total_tokens, 3, nheads, headdim)")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, learnable_sink=learnable_sink)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                    *, learnable_sink=None):
    """flash_attn_varlen_func with q: (total_q, nheads, headdim), kv: (total_k, 2, nheads_k, headdim)."""
    check_devices(q=q, kv=kv)
    check_packed_shape(kv, "kv", 1, 2, "(total_tokens, 2, nheads_k, headdim)")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, learnable_sink=learnable_sink)


def _append_to_cache(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, rotary, positional, block_table=None):
    """Writes k, v into the caches at rows seqlens[b] + i of cache row cache_batch_idx[b], or of
    sequence b's pages when block_table is given (indices clamped into the caches: no host check),
    rotary-embedded first when rotary = (cos, sin, interleaved) is given; returns q, rotated
    likewise (flash_attn_with_kvcache's positions)."""
    batch, seqlen_q = q.shape[:2]
    seqlen_new = k.shape[1]
    steps = torch.arange(max(seqlen_new, seqlen_q), device=q.device, dtype=torch.int32)
    if rotary is not None:
        cos, sin, interleaved = rotary
        last = cos.shape[0] - 1
        k = apply_rotary(k, cos, sin, (seqlens[:, None] + steps[None, :seqlen_new]).clamp(0, last), interleaved)
        q_steps = steps[None, :seqlen_q] if positional else torch.zeros_like(steps[None, :seqlen_q])
        q = apply_rotary(q, cos, sin, (seqlens[:, None] + q_steps).clamp(0, last), interleaved)
    positions = seqlens[:, None] + steps[None, :seqlen_new]
    if block_table is not None:
        cache_rows, rows = _paged_rows(block_table, positions.clamp(min=0), k_cache.shape[1], k_cache.shape[0])
    else:
        rows = positions.clamp(0, k_cache.shape[1] - 1).long()
        cache_rows = (cache_batch_idx if cache_batch_idx is not None
                      else torch.arange(batch, device=q.device)).clamp(0, k_cache.shape[0] - 1).long()[:, None]
    k_cache[cache_rows, rows] = k
    v_cache[cache_rows, rows] = v
    return q


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, learnable_sink=None):
    """Attention of q against a KV cache, appending new keys and values first (incremental
    decoding). Inference only: no gradients.

    q: (batch, seqlen_q, nheads, headdim); k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k,
    headdim). Sequence b uses cache row cache_batch_idx[b] (b when None) and its keys
    [cache_leftpad[b] (0 when None), cache_seqlens[b] + seqlen_new). With k, v (batch, seqlen_new,
    nheads_k, headdim), they are written into the caches *in place* at rows cache_seqlens[b] ...
    cache_seqlens[b] + seqlen_new - 1 before the attention (duplicate cache_batch_idx entries write
    the same rows: any of them may win). cache_seqlens: an int or int32 tensor (batch,); None means
    every sequence is the whole cache (then k, v must be None).
    rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2): the new k is rotated at positions
    cache_seqlens[b] + i, and q at the same positions when causal or windowed, else all at
    cache_seqlens[b];
    rotary_interleaved picks the channel pairing (see flash_attn_t.rotary).
    causal aligns the mask bottom-right on each sequence's keys. Few query rows against long caches
    run split-KV (flash_attn_t.decode): num_splits = 0 picks the split count from the SM count,
    1 splits nothing, n > 1 cuts each sequence's keys into n. Returns out (q's shape) or, with
    return_softmax_lse=True, (out, lse (batch, nheads, seqlen_q) fp32).
    learnable_sink (nheads,): a logit per head in each row's softmax normaliser (gpt-oss), as in
    flash_attn_func.
    No host synchronisation: values of the index tensors outside their ranges are clamped by the
    kernels, never read or written out of bounds; FLASH_ATTN_T_CHECK_VALUES=1 checks them instead.
    alibi_slopes as in flash_attn_func (then no split-KV); block_table accepts only None for now.
    """
    optional = (("k", k), ("v", v), ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                ("cache_seqlens", cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None),
                ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad), ("block_table", block_table))
    check_devices(q=q, k_cache=k_cache, v_cache=v_cache, **{name: t for name, t in optional if t is not None})
    capacity = check_block_table(block_table, q.shape[0], q.device, k_cache, cache_batch_idx, cache_leftpad)
    seqlens = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, capacity)
    window_size = check_window_size(window_size)
    softcap = check_softcap(softcap)
    check_unimplemented(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, block_table=block_table)
    alibi_slopes = check_alibi_slopes(alibi_slopes, q, q.shape[0], q.shape[2])
    check_learnable_sink(learnable_sink, q, q.shape[2])
    check_rotary(rotary_cos, rotary_sin, q.shape[-1], k is not None)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    check_num_splits(num_splits)
    ops.require_extension()
    # the kernels read the index tensors as plain arrays
    cache_batch_idx, cache_leftpad = (t if t is None else t.contiguous() for t in (cache_batch_idx, cache_leftpad))

    if seqlens is None:
        seqlens = torch.full((q.shape[0],), capacity or k_cache.shape[1], dtype=torch.int32, device=q.device)
    if k is not None:
        rotary = (rotary_cos, rotary_sin, rotary_interleaved) if rotary_cos is not None else None
        positional = causal or window_size != (-1, -1)  # q's rows at their own positions (flash_attn's rule)
        q = _append_to_cache(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, rotary, positional, block_table)
        seqlens = seqlens + k.shape[1]
    head_dim = q.shape[-1]
    q_, k_cache_, v_cache_ = _pad_head_dim(q, k_cache, v_cache)
    splits = 0 if alibi_slopes is not None else decode.plan(q_, k_cache_, causal, window_size,
                                                            operator.index(num_splits), capacity)
    if splits:
        out, lse = decode.split_kv_attention(q_, k_cache_, v_cache_, seqlens, cache_batch_idx, cache_leftpad,
                                             softmax_scale, splits, softcap=softcap, block_table=block_table)
        if learnable_sink is not None:
            out, lse = sinks.apply_sink(out, lse, learnable_sink)
    else:
        out, lse = torch.ops.flash_attn_t.fwd_kvcache(
            q_, k_cache_, v_cache_, seqlens, cache_batch_idx, cache_leftpad, softmax_scale, bool(causal), *window_size,
            softcap, alibi_slopes=alibi_slopes, learnable_sink=_kernel_sink(learnable_sink), block_table=block_table)
    out = _unpad_head_dim(out, head_dim)
    return (out, lse) if return_softmax_lse else out
