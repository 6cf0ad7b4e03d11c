"""The compiled kernels as torch.library ops, with fake (meta) implementations for torch.compile.

csrc/flash_api.cpp defines torch.ops.flash_attn_t.fwd / bwd / fwd_kvcache / varlen_fwd / varlen_bwd / merge_splits and
their CUDA implementations; importing flash_attn_t._C registers them. Without the extension the package
still imports (the reference and the argument checks work); calling a kernel raises ImportError.
An extension built for another torch release makes the import itself fail (build_info.check).
"""
import torch

from . import build_info

build_info.check()  # a build for another torch: a clear ImportError, not an undefined symbol

try:
    from . import _C  # noqa: F401  (registers the ops)

    _EXTENSION_ERROR = None
except ImportError as err:
    _EXTENSION_ERROR = err


def extension_available():
    return _EXTENSION_ERROR is None


def require_extension():
    if _EXTENSION_ERROR is not None:
        raise ImportError(
            "flash_attn_t's CUDA extension (flash_attn_t._C) is not built: build it in the repository root with "
            f"`{build_info.REBUILD_COMMAND}` (import error: {_EXTENSION_ERROR})")


# Fake implementations: outputs of the right shape, dtype and device, contiguous like the real ones.

def _out_and_lse(q, lse_shape):
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _grads(q, k, v):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if extension_available():

    @torch.library.register_fake("flash_attn_t::fwd")
    def _fwd_fake(q, k, v, softmax_scale, causal, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                  learnable_sink=None, dropout_p=0.0, rng_state=None):
        batch, seqlen_q, heads, _ = q.shape
        return _out_and_lse(q, (batch, heads, seqlen_q))

    @torch.library.register_fake("flash_attn_t::fwd_kvcache")
    def _fwd_kvcache_fake(q, k_cache, v_cache, seqused_k, kv_batch_idx, leftpad_k, softmax_scale, causal,
                          window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, num_splits=1,
                          learnable_sink=None, block_table=None):
        batch, seqlen_q, heads, dim = q.shape
        out = q.new_empty(batch * num_splits, seqlen_q, heads, dim)
        return out, q.new_empty(batch * num_splits, heads, seqlen_q, dtype=torch.float32)

    @torch.library.register_fake("flash_attn_t::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, window_left=-1, window_right=-1,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None):
        return (*_grads(q, k, v), lse.new_empty(lse.shape))

    @torch.library.register_fake("flash_attn_t::varlen_fwd")
    def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                         window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, learnable_sink=None,
                         block_table=None, dropout_p=0.0, rng_state=None):
        total_q, heads, _ = q.shape
        return _out_and_lse(q, (heads, total_q))

    @torch.library.register_fake("flash_attn_t::merge_splits")
    def _merge_splits_fake(out_partial, lse_partial, num_splits, group):
        splits_batch, rows, heads_k, dim = out_partial.shape
        batch, seqlen_q = splits_batch // num_splits, rows // group
        return (out_partial.new_empty(batch, seqlen_q, heads_k * group, dim),
                lse_partial.new_empty(batch, heads_k * group, seqlen_q))

    @torch.library.register_fake("flash_attn_t::varlen_bwd")
    def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, deterministic, window_left=-1, window_right=-1, softcap=0.0,
                         alibi_slopes=None, dropout_p=0.0, rng_state=None):
        return (*_grads(q, k, v), lse.new_empty(lse.shape))
