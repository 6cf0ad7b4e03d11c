"""Split-KV attention for few queries against many keys (decoding): the keys of each sequence are
cut into splits that run as separate CTAs, and the query heads sharing a kv head are packed into
one block of rows, so each K/V tile is read once for its whole group; the partial outputs are then
merged exactly through their log-sum-exp.

A decode step is two launches: the KV-cache form of the forward kernel
(torch.ops.flash_attn_t.fwd_kvcache with num_splits), which cuts each sequence's keys
[leftpad_b, seqused_b) into equal parts itself and writes one output row per (sequence, split),
and torch.ops.flash_attn_t.merge_splits, which merges them and puts each packed row back in its
(query, head) place. Nothing is computed or copied per split on the host side, and a step stays
capturable in a CUDA graph. Packing turns the group's heads into rows, which changes what a row's
position is, so it is used when the mask does not depend on positions: one query row, or no
causal mask.
"""
import functools
import math

import torch

# A split should hold at least this many keys (a few key blocks): shorter ones cost more in
# launch width and merging than they add in parallelism.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


def choose_splits(batch, kv_heads, rows, max_keys, sms, block_rows=64):
    """How many splits per sequence fill the GPU: 1 when the (batch, kv head, row block) CTAs
    already make most of a wave; otherwise as many as fit in one wave (rounding up starts a
    second wave of a few CTAs, each as long as the first: 1 x 131k keys, 8 kv heads on 132 SMs
    took 375 us in 17 splits, 201 us in 16), each with at least MIN_KEYS_PER_SPLIT keys of the
    longest possible sequence."""
    ctas = batch * kv_heads * math.ceil(rows / block_rows)
    if ctas == 0 or ctas >= 0.8 * sms:
        return 1
    return max(1, min(MAX_SPLITS, sms // ctas, max_keys // MIN_KEYS_PER_SPLIT))


# Packed rows at most: beyond one block of rows the prefill kernels' own tiling serves as well.
MAX_PACKED_ROWS = 64


def _sms(device):
    # (no GPU: shape-only fake tensors, any count will do)
    return _sm_count(device.index or 0) if torch.cuda.is_available() else 1


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    # (get_device_properties took ~15 us a call in a decode call's profile, of ~100 us in all)
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(q, k, causal, window=(-1, -1), num_splits=0, max_keys=None):
    """The number of splits for split_kv_attention, or 0 when the plain kernel path is the better
    one: more than MAX_PACKED_ROWS packed rows, a position-dependent mask over several query rows
    (causal with seqlen_q > 1: packing would move rows off their positions), a sliding window (a
    split's keys would move the window's alignment; the kernel skips the keys outside it anyway),
    too few keys to split when the count is left to us, or nothing to gain (no group to pack and
    one split). num_splits: 0 = choose from the SM count. max_keys: a sequence's most keys (k's
    length by default; a paged cache's capacity)."""
    batch, seqlen_q, heads, _ = q.shape
    kv_heads, max_keys = k.shape[2], k.shape[1] if max_keys is None else max_keys
    rows = seqlen_q * (heads // kv_heads)
    positional = (causal and seqlen_q > 1) or tuple(window) != (-1, -1)
    if rows > MAX_PACKED_ROWS or positional or (not num_splits and max_keys < 2 * MIN_KEYS_PER_SPLIT):
        return 0
    splits = num_splits or choose_splits(batch, kv_heads, rows, max_keys, _sms(q.device))
    return 0 if splits == 1 and heads == kv_heads else splits


def split_kv_attention(q, k_cache, v_cache, seqused_k, kv_batch_idx, leftpad_k, softmax_scale, num_splits,
                       softcap=0.0, attend=None, block_table=None):
    """Non-causal attention of q (batch, seqlen_q, nheads, d) against cache rows kv_batch_idx[b]
    (b when None), keys [leftpad_k[b] (0 when None), seqused_k[b] (seqlen_cache when None)) of
    k_cache / v_cache (batch_cache, seqlen_cache, nheads_k, d), through num_splits splits per
    sequence with the query heads of each kv head packed into rows. Returns (out like q, lse
    (batch, nheads, seqlen_q) fp32, +inf for rows that see no key). softcap as in flash_attn_func
    (the merge is exact for it too: each split's lse is of the capped scores). `attend` computes
    one fwd_kvcache call (the kernel by default, then merged by the merge_splits kernel; the CPU
    tests pass an exact emulation, merged here by merge_splits below). block_table: the caches
    are paged (the kernel path only)."""
    if attend is None:
        out, lse = torch.ops.flash_attn_t.fwd_kvcache(
            _packed_rows(q, k_cache.shape[2]), k_cache, v_cache, seqused_k, kv_batch_idx, leftpad_k, softmax_scale,
            False, softcap=softcap, num_splits=num_splits, block_table=block_table)
        return torch.ops.flash_attn_t.merge_splits(out, lse, num_splits, q.shape[2] // k_cache.shape[2])
    batch, seqlen_q, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group, rows, splits = heads // kv_heads, seqlen_q * heads // kv_heads, num_splits
    packed = _packed_rows(q, kv_heads)
    out, lse = attend(packed, k_cache, v_cache, seqused_k, kv_batch_idx, leftpad_k, softmax_scale, splits)
    out, lse = merge_splits(out.view(batch, splits, rows, kv_heads, head_dim), lse.view(batch, splits, kv_heads, rows))
    out = out.view(batch, seqlen_q, group, kv_heads, head_dim).transpose(2, 3).reshape(q.shape).to(q.dtype)
    lse = lse.view(batch, kv_heads, seqlen_q, group).transpose(2, 3).reshape(batch, heads, seqlen_q)
    return out, lse


def _packed_rows(q, kv_heads):
    """q (batch, seqlen_q, heads, d) with the heads of each kv head packed into rows, ordered
    (query, head in group): packed[b, s * group + g, j] = q[b, s, j * group + g] (a view, no copy,
    for one query row)."""
    batch, seqlen_q, heads, head_dim = q.shape
    group = heads // kv_heads
    if seqlen_q == 1:  # a decode step: one view op instead of three (host time per call)
        batch_stride, _, head_stride, dim_stride = q.stride()
        return q.as_strided((batch, group, kv_heads, head_dim), (batch_stride, head_stride, group * head_stride,
                                                                 dim_stride))
    return q.view(batch, seqlen_q, kv_heads, group, head_dim).transpose(2, 3).reshape(batch, seqlen_q * group,
                                                                                    kv_heads, head_dim)


def merge_splits(out, lse):
    """out (batch, splits, rows, heads, d), lse (batch, splits, heads, rows) with +inf for splits
    that saw no key: the exact softmax merge over the splits, in fp32 (fp64 for fp64 input).
    Returns out (batch, rows, heads, d) and lse (batch, heads, rows), +inf where no split saw a key."""
    accum = torch.float64 if lse.dtype == torch.float64 else torch.float32
    lse = torch.where(lse == math.inf, -math.inf, lse.to(accum))
    total = torch.logsumexp(lse, dim=1)  # (batch, heads, rows)
    weights = torch.exp(lse - torch.where(total == -math.inf, 0.0, total)[:, None])  # (batch, splits, heads, rows)
    merged = (out.to(accum) * weights.transpose(2, 3)[..., None]).sum(dim=1)
    return merged, torch.where(total == -math.inf, math.inf, total)
