"""CPU: the reference attention against a softmax written out independently."""
import math

import pytest
import torch

from flash_attn_t.reference import attention_reference


def naive_attention(q, k, v, scale, causal):
    """(b, s, h, d) in float64, explicit loops over batch and heads."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("inf"), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                limit = i + sk - sq if causal else sk - 1
                if limit < 0 or sk == 0:
                    continue
                s = (q[bi, i, hi].double() @ k[bi, : limit + 1, kh].double().T) * scale
                m = s.max()
                w = torch.exp(s - m)
                out[bi, i, hi] = (w / w.sum()) @ v[bi, : limit + 1, kh].double()
                lse[bi, hi, i] = m + torch.log(w.sum())
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 9), (9, 5), (16, 16), (3, 0)])
@pytest.mark.parametrize("heads,heads_k", [(2, 2), (4, 1)])
def test_reference_matches_naive(causal, sq, sk, heads, heads_k):
    torch.manual_seed(sq * 31 + sk)
    q = torch.randn(2, sq, heads, 8)
    k = torch.randn(2, sk, heads_k, 8)
    v = torch.randn(2, sk, heads_k, 8)
    out, lse = attention_reference(q, k, v, causal=causal)
    ref_out, ref_lse = naive_attention(q, k, v, 1 / math.sqrt(8), causal)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_are_zero_with_infinite_lse_and_zero_grads():
    # causal with sq > sk: the first sq - sk rows see no key
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, causal=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isinf(lse[..., :3]).all() and (lse[..., :3] > 0).all()
    assert torch.isfinite(lse[..., 3:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :3], torch.zeros_like(q.grad[:, :3]))


def test_reference_gradients_match_autograd_of_naive_softmax():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 7, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, _ = attention_reference(q, k, v, causal=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    naive = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
    naive_grads = torch.autograd.grad(naive.sum(), (q, k, v))
    for g, n in zip(grads, naive_grads):
        torch.testing.assert_close(g, n)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_reference_matches_per_sequence(causal):
    torch.manual_seed(2)
    lens_q, lens_k = [3, 0, 1, 6], [4, 2, 0, 6]
    cu_q = torch.tensor([0, 3, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6, 12], dtype=torch.int32)
    q, k, v = torch.randn(10, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    out, lse = attention_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert out.shape == (10, 4, 8) and lse.shape == (4, 10)
    for i in range(4):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        ref_out, ref_lse = naive_attention(q[None, qs], k[None, ks], v[None, ks], 1 / math.sqrt(8), causal)
        torch.testing.assert_close(out[qs], ref_out[0])
        torch.testing.assert_close(lse[:, qs], ref_lse[0])


def test_varlen_reference_gradients_are_finite_with_empty_and_masked_sequences():
    cu_q = torch.tensor([0, 4, 4, 5, 9], dtype=torch.int32)  # lengths 4, 0, 1, 4
    cu_k = torch.tensor([0, 2, 5, 5, 7], dtype=torch.int32)  # lengths 2, 3, 0, 2: causal masks rows
    q = torch.randn(9, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(7, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, lse = attention_reference(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    # sequences 0 and 3: 4 queries, 2 keys -> their first 2 rows see nothing; sequence 2: no key
    masked, seen = [0, 1, 4, 5, 6], [2, 3, 7, 8]
    assert torch.isinf(lse[:, masked]).all() and torch.isfinite(lse[:, seen]).all()
    assert torch.equal(out[masked], torch.zeros_like(out[masked]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[masked], torch.zeros_like(q.grad[masked]))


def test_varlen_reference_empty_batch():
    q, k = torch.randn(0, 2, 8), torch.randn(0, 2, 8)
    out, lse = attention_reference(q, k, k, cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                                   cu_seqlens_k=torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_compute_dtype(compute_dtype):
    q = torch.randn(1, 5, 2, 8)
    out, lse = attention_reference(q, q, q, causal=True, compute_dtype=compute_dtype)
    assert out.dtype == lse.dtype == compute_dtype
    ref_out, _ = naive_attention(q, q, q, 1 / math.sqrt(8), causal=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-2, atol=2e-2)


def test_custom_scale_and_large_inputs():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 9, 2, 8) * 8, torch.randn(1, 11, 2, 8) * 8, torch.randn(1, 11, 2, 8)
    out, lse = attention_reference(q, k, v, softmax_scale=0.7, causal=True)
    ref_out, ref_lse = naive_attention(q, k, v, 0.7, causal=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def naive_variant_attention(q, k, v, scale, causal, window, softcap, slopes, sinks):
    """One row at a time, straight from flash_attn's definitions: row i at key position
    p = i + sk - sq sees keys j with (not causal or j <= p), j >= p - left (left >= 0),
    j <= p + right (right >= 0, non-causal); score = softcap * tanh(q.k scale / softcap) (softcap
    > 0), plus -slope |p - j|, or slope j where flash_attn runs its causal kernel (causal or right
    = 0, with no left edge short of the keys); a sink logit joins the normaliser."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("inf"), dtype=torch.float64)
    left, right = window
    causal_form = (causal or right == 0) and (left < 0 or left >= sk)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                p = i + sk - sq
                keys = [j for j in range(sk) if (not causal or j <= p) and (left < 0 or j >= p - left)
                        and (causal or right < 0 or j <= p + right)]
                logits = []
                for j in keys:
                    s = float(q[bi, i, hi].double() @ k[bi, j, kh].double()) * scale
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        slope = float(slopes[hi] if slopes.dim() == 1 else slopes[bi, hi])
                        s += slope * j if causal_form else -slope * abs(p - j)
                    logits.append(s)
                everything = logits + ([float(sinks[hi])] if sinks is not None else [])
                if not everything:
                    continue
                m = max(everything)
                total = sum(math.exp(x - m) for x in everything)
                lse[bi, hi, i] = m + math.log(total)
                for j, s in zip(keys, logits):
                    out[bi, i, hi] += math.exp(s - lse[bi, hi, i]) * v[bi, j, kh].double()
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(6, 6), (4, 9), (9, 4), (5, 0)])
@pytest.mark.parametrize("window", [(-1, -1), (2, 0), (0, 3), (3, -1), (-1, 1)])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("alibi", [None, "heads", "batch_heads"])
@pytest.mark.parametrize("sink", [False, True])
def test_variants_match_their_definitions(causal, sq, sk, window, softcap, alibi, sink):
    torch.manual_seed(sq * 7 + sk)
    q, k, v = torch.randn(2, sq, 4, 8), torch.randn(2, sk, 2, 8), torch.randn(2, sk, 2, 8)
    slopes = {None: None, "heads": torch.rand(4), "batch_heads": torch.rand(2, 4)}[alibi]
    sinks = torch.randn(4) if sink else None
    out, lse = attention_reference(q, k, v, 0.4, causal, window_size=window, softcap=softcap,
                                   alibi_slopes=slopes, sinks=sinks)
    ref_out, ref_lse = naive_variant_attention(q, k, v, 0.4, causal, window, softcap, slopes, sinks)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-10, atol=1e-10)


def test_causal_alibi_forms_give_the_same_output():
    """flash_attn's causal ALiBi (slope j) is the abs form (-slope |p - j|) shifted by a constant
    per row: the same attention output; only the lse moves."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    slopes = torch.rand(2)
    out, _ = attention_reference(q, k, v, causal=True, alibi_slopes=slopes)
    abs_out, _ = naive_variant_attention(q, k, v, 1 / math.sqrt(8), False, (-1, 0), 0.0, slopes, None)
    torch.testing.assert_close(out, abs_out, rtol=1e-10, atol=1e-10)


def test_sink_gradient_matches_finite_differences():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(attention_reference(q, k, v, causal=True, sinks=sinks)[0].sum(), sinks)
    eps = 1e-6
    for h in range(2):
        bump = torch.zeros(2, dtype=torch.float64)
        bump[h] = eps
        plus = attention_reference(q, k, v, causal=True, sinks=sinks.detach() + bump)[0].sum()
        minus = attention_reference(q, k, v, causal=True, sinks=sinks.detach() - bump)[0].sum()
        assert abs(grad[h].item() - (plus - minus).item() / (2 * eps)) < 1e-6


def test_varlen_reference_takes_the_variants():
    torch.manual_seed(5)
    lens = [3, 0, 6]
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    slopes, sinks = torch.rand(3, 4), torch.randn(4)
    out, lse = attention_reference(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, window_size=(2, 0),
                                   softcap=2.0, alibi_slopes=slopes, sinks=sinks)
    start = 0
    for i, n in enumerate(lens):
        part = slice(start, start + n)
        one, one_lse = attention_reference(q[part][None], k[part][None], v[part][None], causal=True,
                                           window_size=(2, 0), softcap=2.0, alibi_slopes=slopes[i], sinks=sinks)
        torch.testing.assert_close(out[part], one[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[:, part], one_lse[0], rtol=1e-12, atol=1e-12)
        start += n
