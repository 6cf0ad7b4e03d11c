"""CPU: the ops' fake (meta) implementations give the shapes, dtypes and devices of the real ones
(torch.compile traces with them), and the package works as far as it can without the extension."""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_attn_t
from conftest import requires_extension
from flash_attn_t import ops
from flash_attn_t.interface import FlashAttnFunc, FlashAttnVarlenFunc


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fwd_bwd_meta(dtype):
    q = torch.empty(2, 33, 8, 128, dtype=dtype, device="meta").transpose(1, 2).transpose(1, 2)
    k = torch.empty(2, 8, 65, 128, dtype=dtype, device="meta")[:, :2].transpose(1, 2)  # strided
    v = torch.empty(2, 65, 2, 128, dtype=dtype, device="meta")
    out, lse = torch.ops.flash_attn_t.fwd(q, k, v, 0.1, True)
    assert out.shape == q.shape and out.dtype == dtype and out.device.type == "meta" and out.is_contiguous()
    assert lse.shape == (2, 8, 33) and lse.dtype == torch.float32 and lse.device.type == "meta"
    dq, dk, dv, dsum = torch.ops.flash_attn_t.bwd(out, q, k, v, out, lse, 0.1, True, False)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dsum.shape == lse.shape and dsum.dtype == torch.float32
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()


@requires_extension
def test_varlen_meta():
    q = torch.empty(40, 8, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(50, 4, 64, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = torch.ops.flash_attn_t.varlen_fwd(q, k, k, cu, cu, 20, 30, 0.1, False)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (8, 40) and lse.dtype == torch.float32
    dq, dk, dv, dsum = torch.ops.flash_attn_t.varlen_bwd(out, q, k, k, out, lse, cu, cu, 20, 30, 0.1, False, True)
    assert dsum.shape == lse.shape and dsum.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


@requires_extension
def test_ops_are_registered_with_the_contract_schemas():
    window = ["window_left", "window_right", "softcap", "alibi_slopes"]
    dropout = ["dropout_p", "rng_state"]
    arguments = {
        "fwd": ["q", "k", "v", "softmax_scale", "causal", *window, "learnable_sink", *dropout],
        "bwd": ["dout", "q", "k", "v", "out", "lse", "softmax_scale", "causal", "deterministic", *window, *dropout],
        "fwd_kvcache": ["q", "k_cache", "v_cache", "seqused_k", "kv_batch_idx", "leftpad_k", "softmax_scale", "causal",
                        *window, "num_splits", "learnable_sink", "block_table"],
        "varlen_fwd": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                       "softmax_scale", "causal", *window, "learnable_sink", "block_table", *dropout],
        "varlen_bwd": ["dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                       "max_seqlen_k", "softmax_scale", "causal", "deterministic", *window, *dropout],
        "merge_splits": ["out_partial", "lse_partial", "num_splits", "group"],
    }
    for name, args in arguments.items():
        schema = getattr(torch.ops.flash_attn_t, name).default._schema
        assert schema.name == f"flash_attn_t::{name}"
        assert [a.name for a in schema.arguments] == args
        assert len(schema.returns) == (4 if name.endswith("bwd") else 2)  # bwd: dq, dk, dv, dsum


@requires_extension
def test_public_api_on_fake_cuda_tensors():
    """The whole forward path of a public function (checks, autograd.Function, op) with the fake kernel."""
    with FakeTensorMode():
        q = torch.randn(2, 33, 8, 64, dtype=torch.float16, device="cuda")
        kv = torch.randn(2, 65, 2, 2, 64, dtype=torch.float16, device="cuda")
        out, lse, probs = flash_attn_t.flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True)
        assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
        assert lse.shape == (2, 8, 33) and lse.dtype == torch.float32 and probs is None


@requires_extension
def test_public_api_records_autograd_only_when_a_gradient_is_needed():
    """Inference calls skip the autograd.Function (host time per decode step); the outputs are the
    same shapes either way, and only a call with an input that requires grad, in grad mode, has a
    graph to differentiate."""
    with FakeTensorMode():
        q = torch.randn(2, 5, 8, 64, dtype=torch.bfloat16, device="cuda")
        k, v = (torch.randn(2, 40, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        cu_q, cu_k = (torch.zeros(3, dtype=torch.int32, device="cuda") for _ in range(2))  # (values unread)
        qv, kv, vv = q.reshape(10, 8, 64), k.reshape(80, 2, 64), v.reshape(80, 2, 64)
        for grad in (False, True):
            leaves = [t.detach().requires_grad_(grad) for t in (q, k, v, qv, kv, vv)]
            out = flash_attn_t.flash_attn_func(*leaves[:3], causal=True)
            out_v = flash_attn_t.flash_attn_varlen_func(*leaves[3:], cu_q, cu_k, 7, 77, causal=True)
            assert out.shape == q.shape and out_v.shape == qv.shape
            assert out.requires_grad == grad and out_v.requires_grad == grad
            with torch.no_grad():
                assert not flash_attn_t.flash_attn_func(*leaves[:3]).requires_grad
                assert not flash_attn_t.flash_attn_varlen_func(*leaves[3:], cu_q, cu_k, 7, 77).requires_grad


@requires_extension
@pytest.mark.parametrize("batch", [2, 0])
def test_autograd_functions_on_meta_tensors(batch):
    """Backward wiring: a packed qkv gets its gradient packed, GQA k/v get k/v-shaped gradients."""
    qkv = torch.empty(batch, 33, 3, 4, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    out, lse = FlashAttnFunc.apply(*qkv.unbind(2), 0.125, True, (-1, -1, 0.0), False, None, None)
    assert out.shape == (batch, 33, 4, 64) and lse.shape == (batch, 4, 33) and not lse.requires_grad
    (dqkv,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype

    q = torch.empty(50, 8, 128, dtype=torch.float16, device="meta", requires_grad=True)
    k, v = (torch.empty(70, 2, 128, dtype=torch.float16, device="meta", requires_grad=True) for _ in range(2))
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu, cu, 30, 40, 0.1, False, (16, 3, 0.0), True, None, None)
    assert out.shape == q.shape and lse.shape == (8, 50)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", ImportError("no module named flash_attn_t._C"))
    with pytest.raises(ImportError, match=r"not built: .*`pip install --no-build-isolation --no-deps -e \.`"):
        ops.require_extension()


def test_package_imports_without_the_extension():
    """With flash_attn_t._C unimportable, the package and the reference work; a kernel call raises
    the ImportError that says how to build, after the argument checks."""
    program = """
import sys
sys.modules["flash_attn_t._C"] = None  # makes `from . import _C` raise ImportError
import pytest, torch
from torch._subclasses.fake_tensor import FakeTensorMode
import flash_attn_t
from flash_attn_t.reference import attention_reference
assert not flash_attn_t.ops.extension_available()
attention_reference(torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64), torch.randn(1, 3, 2, 64))
with pytest.raises(ValueError, match="q must be a CUDA tensor"):
    flash_attn_t.flash_attn_func(*[torch.randn(1, 3, 2, 64, dtype=torch.half)] * 3)
with FakeTensorMode():
    q = torch.randn(1, 3, 2, 64, dtype=torch.half, device="cuda")
    with pytest.raises(ImportError, match="pip install --no-build-isolation --no-deps -e ."):
        flash_attn_t.flash_attn_func(q, q, q)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(flash_attn_t.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
