"""flash-attn-t: exact fused attention for PyTorch with a tensorized online softmax.

The functions below follow the flash_attn 2.x API: `import flash_attn_t as flash_attn` works for
the ones provided.
"""
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .integrations.transformers import patch_transformers, patched, unpatch_transformers

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "patch_transformers",
    "patched",
    "unpatch_transformers",
]
