"""CPU: the fake (meta) implementations of the ops give the shapes and dtypes of the real ones
(torch.compile traces with them)."""
import pytest
import torch

from conftest import requires_extension

pytestmark = requires_extension


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fwd_bwd_fake_shapes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 33, 8, 128, dtype=dtype, device="cuda")
        k = torch.empty(2, 65, 2, 128, dtype=dtype, device="cuda")
        v = torch.empty(2, 65, 2, 128, dtype=dtype, device="cuda")
        out, lse = torch.ops.flash_attn_t.fwd(q, k, v, 0.1, True)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (2, 8, 33) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.flash_attn_t.bwd(out, q, k, v, out, lse, 0.1, True, False)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        assert dq.dtype == dk.dtype == dv.dtype == dtype


def test_varlen_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(40, 8, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(50, 4, 64, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(4, dtype=torch.int32, device="cuda")
        out, lse = torch.ops.flash_attn_t.varlen_fwd(q, k, k, cu, cu, 20, 30, 0.1, False)
        assert out.shape == q.shape and lse.shape == (8, 40) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.flash_attn_t.varlen_bwd(out, q, k, k, out, lse, cu, cu, 20, 30, 0.1, False, True)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)


def test_ops_are_registered_with_schemas():
    for name in ("fwd", "bwd", "varlen_fwd", "varlen_bwd"):
        op = getattr(torch.ops.flash_attn_t, name).default
        assert op._schema.name == f"flash_attn_t::{name}"
