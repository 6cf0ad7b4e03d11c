"""GPU: variable-length (packed) batches against the fp64 reference, with lengths 0, 1 and odd."""
import pytest
import torch

from conftest import assert_close_to_ref, poison_allocator, requires_cuda, requires_extension
from flash_attn_t import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func
from flash_attn_t.reference import attention_reference

pytestmark = [requires_cuda, requires_extension]


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("heads,heads_k", [(4, 4), (6, 2)])
def test_varlen_against_fp64(dtype, head_dim, causal, deterministic, heads, heads_k):
    lens_q = [0, 1, 17, 64, 113, 300]
    lens_k = [5, 1, 0, 200, 113, 129]
    torch.manual_seed(sum(lens_q) + head_dim)
    q = torch.randn(sum(lens_q), heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), heads_k, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), heads_k, head_dim, device="cuda", dtype=dtype)
    dout = torch.randn_like(q)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    poison_allocator()
    out, lse, _ = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         deterministic=deterministic, return_attn_probs=True)
    poison_allocator()
    grads = torch.autograd.grad(out, leaves, dout)
    assert lse.shape == (heads, sum(lens_q))

    refs = []
    for compute_dtype in (torch.float64, dtype):
        ref_leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_reference(*ref_leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                               compute_dtype=compute_dtype)
        refs.append((ref_out, ref_lse, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute_dtype))))
    (ref_out, ref_lse, ref_grads), (pt_out, _, pt_grads) = refs
    assert_close_to_ref(out, ref_out, pt_out, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < 1e-2
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_to_ref(g, ref_g, pt_g, name)


def test_varlen_packed_forms_match_unpacked():
    lens = [3, 0, 70, 129]
    cu = cu_seqlens(lens)
    qkv = torch.randn(sum(lens), 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    expected = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    assert torch.equal(flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True), expected)
    kv = qkv[:, 1:]
    assert torch.equal(flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max(lens), max(lens), causal=True), expected)


def test_varlen_all_empty():
    q = torch.randn(0, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(0, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32, device="cuda")
    out = flash_attn_varlen_func(q, k, k, cu, cu, 0, 0)
    assert out.shape == (0, 4, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_varlen_bad_cu_seqlens_on_gpu():
    q = torch.randn(10, 4, 64, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] \(9\) must equal the number of tokens"):
        flash_attn_varlen_func(q, q, q, cu, cu, 5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_q is on cpu"):
        flash_attn_varlen_func(q, q, q, cu.cpu(), cu, 5, 5)
