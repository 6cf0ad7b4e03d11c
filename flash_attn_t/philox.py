"""Philox4x32 (Salmon et al., SC'11), the counter-based generator the dropout kernels use, with
7 rounds (MASK_ROUNDS, FlashAttention-2's count), written with torch int64 tensors so that it runs
anywhere and serves as the tests' reference for the kernels' keep masks.

The mask (csrc/common/philox.h computes the same): element (bh = batch * nheads + head, query
row i, key column j) of a call with seed s (64 bits) and offset o (the generator's offset, low 32
bits used) draws counter (c0, c1, c2, c3) = (4 * (j >> 5) + ((j >> 1) & 3), i, bh, o) under key
(s & 0xffffffff, s >> 32). Of the 128 random bits, the 16-bit half number 2 * ((j >> 3) & 3) +
(j & 1) (low half of word 0 first) decides: keep when it is below round(p_keep * 65536). So the
8 values of one call belong to the 8 columns 8 t + 2 q + {0, 1} (t = 0..3) of a 32-key group that
one lane of a tensor-core accumulator tile holds (q = its lane % 4): no value is drawn twice.
"""
import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
_MASK = 0xFFFFFFFF
MASK_ROUNDS = 7  # the dropout mask's rounds (csrc/common/philox.h); the generator's standard is 10


def _mulhilo(a, m):
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32) and a constant m < 2^32,
    exact in int64 (partial products of 16-bit halves stay below 2^48)."""
    low = (a & 0xFFFF) * m
    high = (a >> 16) * m
    lo = low + ((high & 0xFFFF) << 16)
    return ((high >> 16) + (lo >> 32)) & _MASK, lo & _MASK


def philox4x32(counter, key, rounds=10):
    """counter: int64 tensor (..., 4) of 32-bit words; key: int64 tensor (..., 2) or a pair of
    ints. Returns the (..., 4) int64 tensor of output words."""
    c0, c1, c2, c3 = (counter[..., n] & _MASK for n in range(4))
    key = torch.as_tensor(key, dtype=torch.int64, device=counter.device)
    k0, k1 = key[..., 0] & _MASK, key[..., 1] & _MASK
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def keep_threshold(p_keep):
    """The 16-bit threshold the kernels compare against: round(p_keep * 65536), at most 65536."""
    return min(65536, max(0, round(p_keep * 65536)))


def dropout_keep_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, p_dropout, device="cpu"):
    """The bool keep mask (batch, nheads, seqlen_q, seqlen_k) of a call with this seed and offset
    (module docstring)."""
    bh = torch.arange(batch * nheads, dtype=torch.int64, device=device).view(-1, 1, 1)
    i = torch.arange(seqlen_q, dtype=torch.int64, device=device).view(1, -1, 1)
    j = torch.arange(seqlen_k, dtype=torch.int64, device=device).view(1, 1, -1)
    shape = (batch * nheads, seqlen_q, seqlen_k)
    counter = torch.stack([(4 * (j >> 5) + ((j >> 1) & 3)).expand(shape), i.expand(shape), bh.expand(shape),
                           torch.full(shape, offset & _MASK, dtype=torch.int64, device=device)], dim=-1)
    words = philox4x32(counter, (seed & _MASK, (seed >> 32) & _MASK), rounds=MASK_ROUNDS)
    half = 2 * ((j >> 3) & 3) + (j & 1)
    word = torch.gather(words, -1, (half >> 1).expand(shape).unsqueeze(-1)).squeeze(-1)
    value = (word >> (16 * (half & 1))) & 0xFFFF
    return (value < keep_threshold(1.0 - p_dropout)).view(batch, nheads, seqlen_q, seqlen_k)
