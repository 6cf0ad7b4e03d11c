import pytest
import torch

from flash_attn_t import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_extension = pytest.mark.skipif(
    not ops.extension_available(),
    reason="flash_attn_t._C is not built (pip install --no-build-isolation -e .)")
# for a GPU test module: pytestmark = GPU
GPU = [pytest.mark.gpu, requires_cuda, requires_extension]


def is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(params=["default", "sm80"])
def kernel_family(request, monkeypatch):
    """Runs a test through each kernel family of this GPU, forward and backward: the default one
    (sm90 on Hopper) and, on Hopper, the sm80 kernels forced with FLASH_ATTN_T_FORCE_SM80=1."""
    if request.param == "sm80":
        if not is_hopper():
            pytest.skip("the sm80 kernels are already the default on this GPU")
        monkeypatch.setenv("FLASH_ATTN_T_FORCE_SM80", "1")
    else:
        monkeypatch.delenv("FLASH_ATTN_T_FORCE_SM80", raising=False)
    return request.param


# for a GPU test module whose calls must pass through every kernel family
GPU_EACH_FAMILY = [*GPU, pytest.mark.usefixtures("kernel_family")]


def poison_allocator(nbytes=256 * 1024 * 1024):
    """Fill memory the caching allocator will hand out next with NaN, so an output element the
    kernels never write shows up as NaN instead of a lucky zero."""
    block = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del block


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(ours, ref, pt, name):
    """ours vs the fp64 reference: at most twice PyTorch's own error in the input dtype (pt),
    plus 1e-4 of the result's scale -- far below bf16/fp16 resolution -- for the cases where
    PyTorch's error is exactly 0 (e.g. one key: its score gradient cancels exactly there, while
    the kernels' P (dP - D) leaves fp32 rounding of the two dot products)."""
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    err, err_pt = max_err(ours, ref), max_err(pt, ref)
    slack = 1e-4 * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    assert err <= 2 * err_pt + slack, f"{name}: error {err:.3e} > 2 x PyTorch's {err_pt:.3e}"
