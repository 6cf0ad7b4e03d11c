"""CPU: split-KV attention's logic (flash_attn_t.decode: packing the query heads of a kv head into
rows, cutting each sequence's keys into splits on the device, the exact merge) with an exact
emulation of the KV-cache kernel, against attention over each whole sequence. The GPU tests
(test_kvcache_gpu.py, test_attention_gpu.py) run the same path on the kernels."""
import math

import pytest
import torch

from flash_attn_t import decode
from flash_attn_t.reference import attention_reference


def emulated_fwd_kvcache(q, k_cache, v_cache, seqused, batch_idx, leftpad, scale, splits):
    """torch.ops.flash_attn_t.fwd_kvcache without a causal mask and with num_splits, the kernels'
    clamping and split bounds included (csrc/common/seq_info.h), in fp64: output row b * splits + s
    is split s of sequence b."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        row = b if batch_idx is None else min(max(int(batch_idx[b]), 0), k_cache.shape[0] - 1)
        end = k_cache.shape[1] if seqused is None else min(max(int(seqused[b]), 0), k_cache.shape[1])
        start = 0 if leftpad is None else min(max(int(leftpad[b]), 0), end)
        for s in range(splits):
            first, last = start + (end - start) * s // splits, start + (end - start) * (s + 1) // splits
            out, lse = attention_reference(q[b:b + 1], k_cache[row:row + 1, first:last],
                                           v_cache[row:row + 1, first:last], scale, causal=False)
            outs.append(out)
            lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("splits", [1, 3])
def test_split_kv_without_seqused_reads_the_whole_cache(splits):
    """seqused_k None (flash_attn_func's decode path): every key of the cache, no lengths tensor."""
    torch.manual_seed(splits)
    q = torch.randn(2, 1, 4, 16, dtype=torch.float64)
    k_cache = torch.randn(2, 50, 2, 16, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    out, lse = decode.split_kv_attention(q, k_cache, v_cache, None, None, None, 0.25, splits,
                                         attend=emulated_fwd_kvcache)
    ref_out, ref_lse = attention_reference(q, k_cache, v_cache, 0.25)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
@pytest.mark.parametrize("indices", [False, True])
def test_split_kv_matches_whole_sequence_attention(seqlen_q, heads, kv_heads, splits, indices):
    torch.manual_seed(seqlen_q * 100 + heads * 10 + splits)
    batch, batch_cache, seqlen_cache, dim = 4, 6, 90, 16
    q = torch.randn(batch, seqlen_q, heads, dim, dtype=torch.float64)
    k_cache = torch.randn(batch_cache, seqlen_cache, kv_heads, dim, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    seqused = torch.tensor([0, 1, 37, 90], dtype=torch.int32)  # a sequence with no key, one shorter than splits
    batch_idx = torch.tensor([5, 0, 3, 1], dtype=torch.int32) if indices else None
    leftpad = torch.tensor([0, 1, 10, 89], dtype=torch.int32) if indices else None
    scale = 0.3

    out, lse = decode.split_kv_attention(q, k_cache, v_cache, seqused, batch_idx, leftpad, scale, splits,
                                         attend=emulated_fwd_kvcache)
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)
    for b in range(batch):
        row = int(batch_idx[b]) if indices else b
        start = int(leftpad[b]) if indices else 0
        keys = slice(start, int(seqused[b]))
        ref_out, ref_lse = attention_reference(q[b:b + 1], k_cache[row:row + 1, keys], v_cache[row:row + 1, keys],
                                               scale)
        torch.testing.assert_close(out[b:b + 1], ref_out, rtol=1e-10, atol=1e-10)
        assert torch.equal(torch.isinf(lse[b:b + 1]), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[b:b + 1][finite], ref_lse[finite], rtol=1e-10, atol=1e-10)


def test_merge_of_splits_without_keys():
    out = torch.randn(1, 3, 2, 1, 4, dtype=torch.float64)
    lse = torch.tensor([math.inf, 0.5, math.inf], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 1, 2).clone()
    lse[0, :, 0, 1] = math.inf  # row 1: no split saw a key
    merged, merged_lse = decode.merge_splits(out, lse)
    torch.testing.assert_close(merged[0, 0], out[0, 1, 0], rtol=0, atol=1e-12)
    assert torch.equal(merged[0, 1], torch.zeros_like(merged[0, 1])) and merged_lse[0, 0, 1] == math.inf
    assert merged_lse[0, 0, 0] == 0.5


@pytest.mark.parametrize("shape,causal,num_splits,expected", [
    ((1, 1, 32, 128), True, 0, "split"),      # one query row, a long cache: split and pack
    ((1, 1, 32, 128), False, 1, "pack"),      # one split asked for: the group still packs
    ((1, 1, 8, 128), False, 1, "plain"),      # no group, one split: nothing to gain
    ((1, 4, 32, 128), True, 0, "plain"),      # causal over 4 rows: packing would break positions
    ((1, 4, 32, 128), False, 0, "split"),     # non-causal: 4 x 4 packed rows
    ((1, 64, 32, 128), False, 0, "plain"),    # 256 packed rows: the prefill tiling
    ((1, 1, 32, 128), False, 0, "plain-short"),
    ((1, 1, 32, 128), (1024, 0), 0, "plain"),  # a window: splits would move its alignment
])
def test_plan(monkeypatch, shape, causal, num_splits, expected):
    monkeypatch.setattr(decode, "_sms", lambda device: 132)
    batch, seqlen_q, heads, dim = shape
    keys = 100 if expected == "plain-short" else 32768
    q, k = torch.empty(batch, seqlen_q, heads, dim), torch.empty(batch, keys, 8, dim)
    window = causal if isinstance(causal, tuple) else (-1, -1)
    splits = decode.plan(q, k, causal is True, window, num_splits=num_splits)
    if expected.startswith("plain"):
        assert splits == 0
    elif expected == "pack":
        assert splits == 1
    else:
        assert 1 < splits <= decode.MAX_SPLITS
