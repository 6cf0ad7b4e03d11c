"""flash-attn-t as a HuggingFace transformers attention implementation.

    import flash_attn_t
    flash_attn_t.patch_transformers(model)          # one model (PEFT-wrapped too); or
    flash_attn_t.patch_transformers()               # every model created from now on
    with flash_attn_t.patched(model): ...           # only inside the block
    flash_attn_t.unpatch_transformers()             # back to exactly what was there

or, without patching, `register()` once and `from_pretrained(..., attn_implementation=ATTN_IMPLEMENTATION)`.

The name is "fa_t": transformers takes any implementation name containing "flash" for one of its
own flash-attention paths. The attention function takes what transformers passes to every
implementation -- (batch, heads, seq, head_dim) tensors with k/v heads not repeated, `scaling`,
`is_causal`, `sliding_window`, `softcap`, `dropout` -- plus the padding mask, which the mask
function registered beside it hands over as the 2-d (batch, kv_len) boolean mask (padded batches
are unpadded and run as varlen), and packed sequences (`cu_seq_lens_*` / `max_length_*` from a
flattening collator, or restarting `position_ids` in a batch of one). What the kernels cannot do
falls back, with a one-time warning, to transformers' SDPA implementation (or the model's own
eager one where SDPA cannot do it either), fed an explicit mask: never a wrong answer.
"""
import contextlib
import sys
import warnings

import torch

from .. import ops
from ..interface import (KERNEL_FEATURES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, flash_attn_func, flash_attn_varlen_func,
                         flash_attn_with_kvcache)

ATTN_IMPLEMENTATION = "fa_t"
# What patch_transformers() switches models to us from; an explicit "eager" stays eager.
REPLACED_IMPLEMENTATIONS = (None, "sdpa", "flash_attention_2", "flash_attention_3")

_state = {"registered_over": None, "global_patch": None, "models": []}


def _transformers():
    try:
        import transformers
        from transformers import masking_utils, modeling_utils
    except ImportError as err:
        raise ImportError("flash_attn_t.integrations.transformers needs the transformers package") from err
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        raise ImportError(
            f"transformers {transformers.__version__} is not supported: flash-attn-t needs transformers >= 4.53 "
            "(AttentionMaskInterface, which lets the padding mask reach the attention function)")
    return modeling_utils, masking_utils


# ---------------------------------------------------------------------------------------------
# registration


def padding_mask(*, kv_length, attention_mask=None, **kwargs):
    """The mask function registered with our name: None when nothing is padded (causality and
    windows are the attention function's job), else key_ranges of the 2-d (batch, kv_len) padding
    mask (a StaticCache's covers only the slots filled so far, fewer than kv_length).
    Keyword arguments only: transformers releases pass different sets beside these two."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return key_ranges(attention_mask)


def key_ranges(mask):
    """A padding mask (batch, kv_len), or a StaticCache's (batch, filled slots). Generation makes
    it left padding followed by keys; then it becomes each sequence's key range [first, end) (end
    is the mask's length, where causal rows align) as int32 (batch, 1, 1, 2): a tensor of fixed
    shape whose values the kernels read on the device (flash_attn_with_kvcache's cache_leftpad and
    cache_seqlens), so the attention layers neither sync with the host nor recompile per step.
    (Four dimensions: transformers hands a 4-d mask back unchanged when a model's forward builds
    its masks again from the one generate prepared.) Its firsts and its ends each lie contiguous in
    memory (strides (1, 1, 1, batch)), so every layer passes them to the kernels as they are, with
    no copy. Any other mask (a hole among the keys, right padding) stays a boolean mask for the
    unpadding path. Deciding which costs one host sync per forward, here rather than in every layer."""
    mask = mask.bool()
    if mask.shape[1] > 1 and not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return mask
    batch = mask.shape[0]
    end = torch.full((batch,), mask.shape[1], dtype=torch.int32, device=mask.device)
    return torch.stack([end - mask.sum(1, dtype=torch.int32), end]).as_strided((batch, 1, 1, 2), (1, 1, 1, batch))


def _is_key_ranges(attention_mask):
    return attention_mask is not None and attention_mask.dtype == torch.int32 and attention_mask.dim() == 4


def _filled_slots_mask(ranges):
    """key_ranges' [first, end) as the boolean (batch, end) padding mask of the filled slots (end
    is the same for every sequence; reading it is a host sync: for the paths that need a mask)."""
    end = int(ranges[0, 0, 0, 1]) if ranges.shape[0] else 0
    cols = torch.arange(end, device=ranges.device)
    return (cols >= ranges[:, 0, 0, :1]) & (cols < ranges[:, 0, 0, 1:])


def register():
    """Makes `attn_implementation=ATTN_IMPLEMENTATION` valid in transformers (idempotent)."""
    modeling_utils, masking_utils = _transformers()
    attention, masks = modeling_utils.AttentionInterface, masking_utils.AttentionMaskInterface
    if _state["registered_over"] is None:
        _state["registered_over"] = (attention._global_mapping.get(ATTN_IMPLEMENTATION),
                                     masks._global_mapping.get(ATTN_IMPLEMENTATION))
    attention.register(ATTN_IMPLEMENTATION, attention_forward)
    masks.register(ATTN_IMPLEMENTATION, padding_mask)


def _unregister():
    if _state["registered_over"] is None:
        return
    modeling_utils, masking_utils = _transformers()
    for interface, previous in zip((modeling_utils.AttentionInterface, masking_utils.AttentionMaskInterface),
                                   _state["registered_over"]):
        if previous is None:
            interface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
        else:
            interface._global_mapping[ATTN_IMPLEMENTATION] = previous
    _state["registered_over"] = None


# ---------------------------------------------------------------------------------------------
# patching


def _top_level_models(model):
    """The outermost PreTrainedModels inside `model` (itself, or the base model of a PEFT wrapper)."""
    modeling_utils, _ = _transformers()
    found, inside_found = [], set()
    for module in model.modules():  # parents before their children
        if id(module) not in inside_found and isinstance(module, modeling_utils.PreTrainedModel):
            found.append(module)
            inside_found.update(id(m) for m in module.modules())
    if not found:
        raise TypeError(f"model must be (or wrap) a transformers PreTrainedModel, got {type(model).__name__}")
    return found


def _set_implementation(model, implementation):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


def patch_transformers(model=None):
    """Switches `model` -- or, with no model, every model created from now on that asks for the
    default, "sdpa" or a "flash_attention_*" implementation -- to flash-attn-t. Idempotent;
    touches no parameters or state dicts. Undo with unpatch_transformers()."""
    register()
    if model is not None:
        for m in _top_level_models(model):
            if m.config._attn_implementation != ATTN_IMPLEMENTATION:
                _state["models"].append((m, m.config._attn_implementation))
                _set_implementation(m, ATTN_IMPLEMENTATION)
        return model
    if _state["global_patch"] is None:
        modeling_utils, _ = _transformers()
        original = modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation

        def check_and_adjust(self, attn_implementation, *args, **kwargs):
            if attn_implementation in REPLACED_IMPLEMENTATIONS:
                attn_implementation = ATTN_IMPLEMENTATION
            return original(self, attn_implementation, *args, **kwargs)

        modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation = check_and_adjust
        _state["global_patch"] = original
    return None


def unpatch_transformers():
    """Restores what patch_transformers() changed: each patched model's implementation, the
    model-creation hook, and the interfaces' entries under our name."""
    while _state["models"]:
        model, previous = _state["models"].pop()
        _set_implementation(model, previous)
    if _state["global_patch"] is not None:
        modeling_utils, _ = _transformers()
        modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation = _state["global_patch"]
        _state["global_patch"] = None
    _unregister()


@contextlib.contextmanager
def patched(model=None):
    """patch_transformers(model) for the duration of a with-block, then unpatch_transformers()."""
    patch_transformers(model)
    try:
        yield model
    finally:
        unpatch_transformers()


# ---------------------------------------------------------------------------------------------
# the attention function


_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"flash-attn-t: {reason}; this attention runs on the fallback path (exact, slower)",
                      stacklevel=3)


def unsupported_reason(query, key, attention_mask, dropout, sliding_window, softcap, kwargs):
    """Why the kernels cannot run this call exactly, or None if they can: first the features the
    call asks for, then what the inputs are."""
    asked = {
        "dropout": (bool(dropout), "attention dropout > 0"),
        "softcap": (bool(softcap), "softcap"),
        "window": (sliding_window is not None and sliding_window < key.shape[2],
                   "a sliding window shorter than the keys"),
        "sinks": (kwargs.get("s_aux") is not None, "attention sinks"),
    }
    for feature, (wanted, what) in asked.items():
        if wanted and not KERNEL_FEATURES[feature]:
            return f"{what} (not implemented in the kernels)"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (the kernels never form the attention matrix)"
    if kwargs.get("position_bias") is not None:
        return "a position bias (not implemented in the kernels)"
    if attention_mask is not None and attention_mask.dim() != 2:
        return f"a {attention_mask.dim()}-d attention mask (the kernels read only padding masks)"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS or key.shape[-1] != query.shape[-1]:
        return f"head dim {query.shape[-1]} (supported: 1 to {SUPPORTED_HEAD_DIMS[-1]})"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"{query.dtype} inputs (the kernels take fp16/bf16: use bf16 weights or autocast)"
    if query.device.type != "cuda":
        return f"inputs on {query.device.type} (the kernels need CUDA)"
    if not ops.extension_available():
        return "the CUDA extension is not built"
    return None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: query (batch, heads, seq_q, head_dim), key and
    value (batch, heads_k, seq_k, head_dim); returns ((batch, seq_q, heads, head_dim), None)."""
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if query.dtype == torch.float32 and query.is_cuda and torch.is_autocast_enabled("cuda"):
        # fp32 weights under autocast: rotary embeddings leave q and k in fp32; the attention
        # matmuls would run in the autocast dtype anyway
        query, key, value = (t.to(torch.get_autocast_dtype("cuda")) for t in (query, key, value))
    ranges = _is_key_ranges(attention_mask)
    reason = unsupported_reason(query, key, None if ranges else attention_mask, dropout, sliding_window, softcap,
                                kwargs)
    if ranges and (reason is not None or dropout or torch.is_grad_enabled() and query.requires_grad):
        attention_mask = _filled_slots_mask(attention_mask)  # the ranges' path is the kernels' inference path
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < key.shape[2]:
        # a StaticCache hands over all its slots, the mask only the filled ones (the first
        # attention_mask.shape[1]): the rest are not keys
        key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
    if reason is not None:
        _warn_once(reason)
        return fallback_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seq, heads, head_dim) views
    # transformers' sliding window: keys j with i - window < j (and j <= i under causal)
    # gpt-oss's attention sinks (s_aux, one logit per head) are the kernels' learnable_sink
    # transformers passes the module's attention dropout in training and 0 in eval, as flash_attn wants
    variant = dict(softmax_scale=scaling, causal=is_causal, softcap=softcap or 0.0, learnable_sink=kwargs.get("s_aux"),
                   dropout_p=dropout or 0.0,
                   window_size=(sliding_window - 1, -1) if sliding_window is not None else (-1, -1))
    if _is_key_ranges(attention_mask):
        return _cached_attention(q, k, v, attention_mask, variant), None
    if attention_mask is not None:
        return _padded_attention(q, k, v, attention_mask, variant), None
    cu_seqlens = _packed_cu_seqlens(kwargs, q.shape[0], q.shape[1])
    if cu_seqlens is not None:
        return _packed_attention(q, k, v, *cu_seqlens, variant), None
    return flash_attn_func(q, k, v, **variant), None


def _packed_cu_seqlens(kwargs, batch, seq_len):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) of a packed batch, or None if it is not packed:
    from a flattening collator's cu_seq_lens_* / max_length_*, or from position_ids that restart
    at 0 inside a batch of one (the padding-free format)."""
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        cu_q, cu_k = kwargs["cu_seq_lens_q"].int(), kwargs["cu_seq_lens_k"].int()
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        return (cu_q, cu_k, int(cu_q.diff().max()) if max_q is None else int(max_q),
                int(cu_k.diff().max()) if max_k is None else int(max_k))
    position_ids = kwargs.get("position_ids")
    if position_ids is None or batch != 1 or position_ids.shape[-1] != seq_len or seq_len < 2:
        return None
    starts = torch.nonzero(position_ids.reshape(-1) == 0).reshape(-1)
    bounds = torch.unique(torch.cat([starts.new_zeros(1), starts, starts.new_tensor([seq_len])]))
    if bounds.numel() <= 2:
        return None  # one sequence: not packed
    cu_seqlens = bounds.to(torch.int32)
    max_len = int((bounds[1:] - bounds[:-1]).max())
    return cu_seqlens, cu_seqlens, max_len, max_len


def _tokens(t):
    """(batch, seq, heads, head_dim) -> (batch * seq, heads, head_dim), the varlen layout."""
    return t.reshape(-1, *t.shape[2:])


def _packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, variant):
    batch = q.shape[0]
    out = flash_attn_varlen_func(_tokens(q), _tokens(k), _tokens(v), cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                                 **variant)
    return out.view(batch, -1, *out.shape[1:])


def _cached_attention(q, k, v, ranges, variant):
    """Each sequence's keys [first, end) (key_ranges) through flash_attn_with_kvcache, causal
    aligned at end: no copies, no host sync. Inference only (attention_forward sends calls that
    need gradients or dropout down the unpadding path)."""
    variant = dict(variant)
    variant.pop("dropout_p")
    return flash_attn_with_kvcache(q, k, v, cache_seqlens=ranges[:, 0, 0, 1], cache_leftpad=ranges[:, 0, 0, 0],
                                   **variant)


def _padded_attention(q, k, v, attention_mask, variant):
    """Unpads with the (batch, kv_len) mask -- the queries are the last seq_q positions of it --
    runs varlen, and scatters the rows back (padded query rows get zeros)."""
    batch, seq_q = q.shape[:2]
    kv_mask = attention_mask.bool()
    q_mask = kv_mask[:, -seq_q:]
    q_rows, k_rows = torch.nonzero(q_mask.reshape(-1)).reshape(-1), torch.nonzero(kv_mask.reshape(-1)).reshape(-1)
    lens_q, lens_k = q_mask.sum(1, dtype=torch.int32), kv_mask.sum(1, dtype=torch.int32)
    cu_q = torch.nn.functional.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = torch.nn.functional.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(_tokens(q)[q_rows], _tokens(k)[k_rows], _tokens(v)[k_rows], cu_q, cu_k,
                                 int(lens_q.max()), int(lens_k.max()), **variant)
    padded = out.new_zeros(batch * seq_q, *out.shape[1:])
    padded[q_rows] = out
    return padded.view(batch, seq_q, *out.shape[1:])


# ---------------------------------------------------------------------------------------------
# fallback


def explicit_mask(query, key, attention_mask, is_causal, sliding_window, kwargs):
    """The boolean (batch, 1, seq_q, seq_k) mask (True: attend) of a call: padding, causality
    aligned bottom-right, the sliding window, packed sequences. A 4-d mask is passed through."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    batch, seq_q, seq_k, device = query.shape[0], query.shape[2], key.shape[2], query.device
    rows = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    cols = torch.arange(seq_k, device=device)[None, :]
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= cols <= rows
    if sliding_window is not None:
        allowed &= cols > rows - sliding_window
    allowed = allowed.expand(batch, 1, seq_q, seq_k)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, -seq_k:]
    cu_seqlens = _packed_cu_seqlens(kwargs, batch, seq_q) if seq_q == seq_k else None
    if cu_seqlens is not None:
        sequence = torch.bucketize(torch.arange(seq_q, device=device), cu_seqlens[0][1:].long(), right=True)
        allowed = allowed & (sequence[:, None] == sequence[None, :])
    return allowed


def fallback_attention(module, query, key, value, attention_mask, *, dropout, scaling, sliding_window, softcap,
                       is_causal, **kwargs):
    """transformers' SDPA implementation, or the model's own eager one for what SDPA cannot do
    (softcap, attention weights, sinks), each given the explicit mask of the call."""
    mask = explicit_mask(query, key, attention_mask, is_causal, sliding_window, kwargs)
    needs_eager = softcap or kwargs.get("output_attentions") or kwargs.get("s_aux") is not None
    for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if needs_eager:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__}: softcap / attention weights / sinks need the "
                                      "model's eager attention, which its module does not define")
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min) if mask.dtype == torch.bool else mask
        return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, softcap=softcap,
                     sliding_window=sliding_window, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)
