"""The compiled kernels as torch.library ops, with fake (meta) implementations for torch.compile.

torch.ops.flash_attn_t.fwd / bwd / varlen_fwd / varlen_bwd are defined and given their CUDA
implementations in csrc/flash_api.cpp; importing flash_attn_t._C registers them.
"""
import torch

try:
    from . import _C  # noqa: F401  (registers the ops)

    _EXTENSION_ERROR = None
except ImportError as err:  # not built: the reference and the argument checks still work
    _EXTENSION_ERROR = err


def extension_available():
    return _EXTENSION_ERROR is None


def require_extension():
    if _EXTENSION_ERROR is not None:
        raise ImportError(
            "flash_attn_t's CUDA extension (flash_attn_t._C) is not built; build it from the repository "
            f"root with `pip install --no-build-isolation -e .` ({_EXTENSION_ERROR})"
        )


def _lse_like(q, shape):
    return q.new_empty(shape, dtype=torch.float32)


if _EXTENSION_ERROR is None:

    @torch.library.register_fake("flash_attn_t::fwd")
    def _fwd_fake(q, k, v, softmax_scale, causal):
        b, sq, h, _ = q.shape
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_like(q, (b, h, sq))

    @torch.library.register_fake("flash_attn_t::varlen_fwd")
    def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        total_q, h, _ = q.shape
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_like(q, (h, total_q))

    def _grads_fake(q, k, v):
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))

    @torch.library.register_fake("flash_attn_t::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, softmax_scale, causal, deterministic):
        return _grads_fake(q, k, v)

    @torch.library.register_fake("flash_attn_t::varlen_bwd")
    def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, deterministic):
        return _grads_fake(q, k, v)
