"""GPU: torch.library registration (opcheck) and torch.compile(fullgraph=True) through the ops."""
import pytest
import torch

from conftest import GPU
from flash_attn_t import flash_attn_func, flash_attn_varlen_func

pytestmark = GPU


def test_opcheck_all_ops():
    q = torch.randn(2, 70, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 90, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 90, 2, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = torch.ops.flash_attn_t.fwd(q, k, v, 0.125, True)
    torch.library.opcheck(torch.ops.flash_attn_t.fwd.default, (q, k, v, 0.125, True))
    torch.library.opcheck(torch.ops.flash_attn_t.bwd.default, (torch.randn_like(out), q, k, v, out, lse, 0.125,
                                                               True, True))
    cu_q = torch.tensor([0, 30, 70], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 50, 90], dtype=torch.int32, device="cuda")
    qv, kv, vv = q[0], k[0], v[0]
    out, lse = torch.ops.flash_attn_t.varlen_fwd(qv, kv, vv, cu_q, cu_k, 40, 50, 0.125, False)
    torch.library.opcheck(torch.ops.flash_attn_t.varlen_fwd.default, (qv, kv, vv, cu_q, cu_k, 40, 50, 0.125, False))
    torch.library.opcheck(torch.ops.flash_attn_t.varlen_bwd.default,
                          (torch.randn_like(out), qv, kv, vv, out, lse, cu_q, cu_k, 40, 50, 0.125, False, True))


@pytest.mark.parametrize("causal", [False, True])
def test_torch_compile_fullgraph_matches_eager(causal):
    torch._dynamo.reset()

    def attention_block(q, k, v):
        return flash_attn_func(q * 1.0, k, v, causal=causal).float().square().sum()

    compiled = torch.compile(attention_block, fullgraph=True)
    leaves = [torch.randn(2, 100, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_loss = attention_block(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_varlen_fullgraph():
    torch._dynamo.reset()
    cu = torch.tensor([0, 40, 100], dtype=torch.int32, device="cuda")

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu, cu, 60, 60, causal=True)

    q = torch.randn(100, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    out = torch.compile(fn, fullgraph=True)(q, q, q)
    torch.testing.assert_close(out, fn(q, q, q))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
