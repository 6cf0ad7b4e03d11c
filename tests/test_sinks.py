"""CPU: attention sinks applied to (out, lse) as the split-KV path does (flash_attn_t.sinks)
against the reference with sinks, forward and the sink's gradient from dsum = rowsum(dout * out),
batched and varlen layouts, with rows that see no key. The GPU tests (test_attention_gpu.py,
test_kvcache_gpu.py, test_transformers_gpu.py) run the kernels' own sink epilogue."""
import math

import pytest
import torch

from flash_attn_t import sinks
from flash_attn_t.reference import attention_reference


def dsum_like_lse(dout, out):
    """rowsum(dout * out) in lse's layout, as the backward op returns it."""
    return (dout * out.detach()).sum(-1).transpose(-1, -2)


def assert_sink_matches_reference(q, k, v, sink, dout, **variant):
    """apply_sink on the sink-free reference's (out, lse) equals the reference with the sink, and
    sink_grad from dsum equals the reference's gradient of the sink."""
    out0, lse0 = attention_reference(q, k, v, **variant)  # the kernels' convention: lse +inf without keys
    out, lse = sinks.apply_sink(out0, lse0, sink.detach())
    ref_out, ref_lse = attention_reference(q, k, v, sinks=sink, **variant)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-12, atol=1e-12)
    (ref_grad,) = torch.autograd.grad(ref_out, sink, dout)
    torch.testing.assert_close(sinks.sink_grad(dsum_like_lse(dout, ref_out), ref_lse.detach(), sink.detach()), ref_grad,
                               rtol=1e-10, atol=1e-12)
    return lse0


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1))])
@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 5)])  # 9 > 5 causal: rows without keys
def test_sink_applied_to_kernel_output_matches_reference(causal, window, sq, sk):
    torch.manual_seed(sq * 10 + sk)
    q = torch.randn(2, sq, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(2, sk, 2, 8, dtype=torch.float64) for _ in range(2))
    sink = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dout = torch.randn_like(q)
    lse0 = assert_sink_matches_reference(q, k, v, sink, dout, causal=causal, window_size=window)
    if causal and sq > sk:
        assert torch.isinf(lse0).any()  # the case of rows that see no key is exercised


def test_sink_in_the_varlen_layout():
    torch.manual_seed(3)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty sequence among them
    q, k, v = (torch.randn(10, 4, 8, dtype=torch.float64) for _ in range(3))
    sink = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dout = torch.randn_like(q)
    assert_sink_matches_reference(q, k, v, sink, dout, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)


def test_a_row_without_keys_gets_the_sink_as_lse_and_zero_output():
    out = torch.zeros(1, 1, 2, 4)
    lse = torch.full((1, 2, 1), math.inf)
    new_out, new_lse = sinks.apply_sink(out, lse, torch.tensor([0.5, -2.0]))
    assert torch.equal(new_out, out)
    assert torch.equal(new_lse, torch.tensor([0.5, -2.0]).view(1, 2, 1))
