"""Attention sinks (gpt-oss): a learnable logit per head that joins the softmax normaliser and
carries no value. With lse the log-normaliser of a row over its keys and s the head's sink,

    lse' = logaddexp(lse, s),    out' = out * exp(lse - lse').

The forward kernels apply this in their epilogue (OnlineSoftmax::finalize); apply_sink does it
to (out, lse) for the split-KV path, whose splits are merged before the sink may join. The
backward kernels take (out', lse') as they are: P = exp(scores - lse') are then the
sink-normalised probabilities and dS = P (dP - D) with D = rowsum(dO out') is already the right
score gradient. The sink's own gradient is d loss / d s = -sum over rows of exp(s - lse') D, from
the D the backward returns (dsum).

Layouts: batched out (batch, seqlen, heads, d) with lse (batch, heads, seqlen); varlen out
(total, heads, d) with lse (heads, total); dsum like lse. lse is +inf on rows that see no key
(the kernels' convention); such a row keeps out = 0 and gets lse' = s.
"""
import math

import torch


def _accum(lse):
    # fp32 for the kernels' fp32 lse; fp64 stays fp64 (the CPU tests check the algebra exactly)
    return torch.float64 if lse.dtype == torch.float64 else torch.float32


def _sink_like_lse(sink, lse):
    sink = sink.to(_accum(lse))
    return sink[:, None] if lse.dim() == 2 else sink[None, :, None]


def _rows_to_out_layout(x):
    """(batch, heads, seqlen) -> (batch, seqlen, heads); (heads, total) -> (total, heads)."""
    return x.transpose(-1, -2)


def apply_sink(out, lse, sink):
    """(out', lse') of the docstring above: out in its own dtype, lse' in lse's (fp32)."""
    lse = torch.where(lse == math.inf, -math.inf, lse)
    new_lse = torch.logaddexp(lse, _sink_like_lse(sink, lse))
    scale = _rows_to_out_layout(torch.exp(lse - new_lse))[..., None]
    return (out.to(scale.dtype) * scale).to(out.dtype), new_lse


def sink_grad(dsum, lse, sink):
    """d loss / d sink (heads,) in sink's dtype, from the sink-applied lse and dsum =
    rowsum(dout * out) (laid out like lse)."""
    p_sink = torch.exp(_sink_like_lse(sink, lse) - lse)
    rows = (0, 2) if lse.dim() == 3 else (1,)
    return -(p_sink * dsum.to(p_sink.dtype)).sum(rows).to(sink.dtype)
