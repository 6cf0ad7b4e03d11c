"""Exact attention in plain PyTorch (any device), the ground truth the tests compare against.

Same layouts and semantics as the kernels: (batch, seq, heads, dim) or varlen (total, heads, dim)
with cu_seqlens; GQA by repeating k/v heads inside the computation only; causal aligned
bottom-right (query i sees keys j <= i + seqlen_k - seqlen_q); a query row that sees no key
outputs zeros and lse = +inf. Differentiable, with zero (never NaN) gradients for such rows.
"""
import math

import torch


def visible_keys(seqlen_q, seqlen_k, causal, window_size=(-1, -1), device=None):
    """(seqlen_q, seqlen_k) bool: which keys each query row sees. Row i sits at key position
    i + seqlen_k - seqlen_q (bottom-right alignment); causal hides keys right of it; window_size
    (left, right) keeps keys in [pos - left, pos + right], -1 meaning unbounded (causal sets
    right to 0), as flash_attn defines them."""
    rows = torch.arange(seqlen_q, device=device)[:, None] + seqlen_k - seqlen_q
    cols = torch.arange(seqlen_k, device=device)[None, :]
    left, right = window_size
    right = 0 if causal else right
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= cols <= rows + right
    if left >= 0:
        visible &= cols >= rows - left
    return visible


def alibi_bias(slopes, seqlen_q, seqlen_k, causal):
    """(batch or 1, heads, seqlen_q, seqlen_k) additive bias of ALiBi slopes ((heads,) or (batch,
    heads)) as flash_attn applies it: -slope * |i + seqlen_k - seqlen_q - j|, and under causal the
    row-constant-shifted form slope * j (the same softmax; the lse differs by that constant)."""
    slopes = slopes.reshape(-1, slopes.shape[-1])[:, :, None, None]
    cols = torch.arange(seqlen_k, device=slopes.device, dtype=slopes.dtype)
    if causal:
        return slopes * cols
    rows = torch.arange(seqlen_q, device=slopes.device, dtype=slopes.dtype)[:, None] + seqlen_k - seqlen_q
    return -slopes * (rows - cols).abs()


def _attention_bhsd(q, k, v, softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    sinks=None, dropout_p=0.0, dropout_keep=None):
    """q: (b, h, sq, d); k, v: (b, h_k, sk, d), already in the compute dtype; dropout_keep: bool
    (b, h, sq, sk) or None. Returns out, lse (b, h, sq)."""
    heads, heads_k = q.shape[1], k.shape[1]
    if heads != heads_k:
        k = k.repeat_interleave(heads // heads_k, dim=1)
        v = v.repeat_interleave(heads // heads_k, dim=1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        # flash_attn's causal form of the bias wherever its kernel runs as causal: a window (-1, 0),
        # with a left edge that reaches every key dropped first
        left, right = window_size
        causal_form = (causal or right == 0) and (left < 0 or left >= seqlen_k)
        scores = scores + alibi_bias(alibi_slopes.to(scores.dtype), seqlen_q, seqlen_k, causal_form)
    visible = visible_keys(seqlen_q, seqlen_k, causal, window_size, q.device)
    has_key = visible.any(dim=-1, keepdim=True)  # (sq, 1)
    # Rows without keys take finite placeholder scores, so logsumexp and its gradient stay finite;
    # their probabilities are zeroed below.
    neg_inf, zero = scores.new_tensor(float("-inf")), scores.new_tensor(0.0)
    scores = torch.where(visible, scores, torch.where(has_key, neg_inf, zero))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    if sinks is not None:  # a per-head logit in the normaliser that carries no value
        sink = sinks.to(scores.dtype)[None, :, None, None].expand_as(lse)
        lse = torch.where(has_key, torch.logaddexp(lse, sink), sink)
    probs = torch.where(visible & has_key, torch.exp(scores - lse), zero)
    if dropout_keep is not None:  # flash_attn's dropout: on the normalised probabilities, lse unchanged
        probs = torch.where(dropout_keep, probs / (1.0 - dropout_p), zero)
    out = torch.matmul(probs, v)
    if sinks is None:
        lse = torch.where(has_key, lse, float("inf"))
    return out, lse.squeeze(-1)


def attention_reference(q, k, v, softmax_scale=None, causal=False, compute_dtype=torch.float64, cu_seqlens_q=None,
                        cu_seqlens_k=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None,
                        dropout_p=0.0, dropout_keep=None):
    """Returns (out, lse) computed in compute_dtype (the caller casts): out shaped like q; lse
    (batch, heads, seqlen_q), or (heads, total_q) for varlen input (cu_seqlens_q and cu_seqlens_k
    given). The attention variants follow flash_attn: window_size (left, right) (see
    visible_keys), softcap (scores -> softcap * tanh(scores / softcap), after the scale),
    alibi_slopes (heads,) or (batch, heads) (see alibi_bias), and sinks (heads,): a logit per head
    that joins the softmax normaliser and carries no value (a row then has lse >= its sink and
    never +inf); dropout_keep, a bool (batch, heads, seqlen_q, seqlen_k) mask (varlen: sequence i
    uses its [i, :, :len_q, :len_k] corner; flash_attn_t.philox.dropout_keep_mask gives the
    kernels' one) with dropout_p: dropped probabilities are zeroed and kept ones divided by
    1 - dropout_p, after the normalisation (lse unchanged). Differentiable in q, k, v and sinks."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    variant = dict(window_size=tuple(window_size), softcap=softcap, sinks=sinks, dropout_p=dropout_p)
    if cu_seqlens_q is None:
        out, lse = _attention_bhsd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale, causal,
                                   alibi_slopes=alibi_slopes, dropout_keep=dropout_keep, **variant)
        return out.transpose(1, 2), lse
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [q[:0]], [q.new_empty(q.shape[1], 0)]  # so that an empty batch concatenates too
    for i in range(len(starts_q) - 1):
        qi = q[starts_q[i]:starts_q[i + 1]].transpose(0, 1)[None]
        ki = k[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        vi = v[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        slopes = None if alibi_slopes is None else alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[i]
        keep = None if dropout_keep is None else dropout_keep[i:i + 1, :, :qi.shape[2], :ki.shape[2]]
        out, lse = _attention_bhsd(qi, ki, vi, softmax_scale, causal, alibi_slopes=slopes, dropout_keep=keep,
                                   **variant)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def attention_backward_reference(dout, q, k, v, out, lse, softmax_scale=None, causal=False,
                                 compute_dtype=torch.float64):
    """dq, dk, dv computed the way the kernels' backward does, from the forward's out and lse (b, h,
    sq): P = exp(q k^T scale - lse), dS = P (dP - D) with D = rowsum(dout * out). Given the out and
    lse of a softmax over more keys than k holds (k, v one block of a longer sequence), it returns
    that block's share of the gradients: ring attention adds these up. Layouts (batch, seq, heads,
    dim); GQA gradients summed over each kv head's group; rows with lse = +inf get zeros."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    dout, q, k, v, out = (t.to(compute_dtype).transpose(1, 2) for t in (dout, q, k, v, out))
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k_rep.transpose(-1, -2)) * softmax_scale
    if causal:
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + seqlen_k - seqlen_q, float("-inf"))
    probs = torch.exp(scores - lse.to(compute_dtype)[..., None])  # 0 where masked or lse = +inf
    dprobs = torch.matmul(dout, v_rep.transpose(-1, -2))
    dscores = probs * (dprobs - (dout * out).sum(-1, keepdim=True))
    dq = torch.matmul(dscores, k_rep) * softmax_scale
    dk = torch.matmul(dscores.transpose(-1, -2), q) * softmax_scale
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    batch, heads_k = k.shape[0], k.shape[1]
    dk, dv = (t.reshape(batch, heads_k, group, seqlen_k, -1).sum(2) for t in (dk, dv))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
