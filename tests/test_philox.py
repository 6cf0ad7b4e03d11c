"""CPU: the Philox4x32 reference (10 rounds) against the generator's published known-answer
vectors, and the dropout keep mask's statistics (7 rounds, flash_attn_t.philox.MASK_ROUNDS)."""
import torch

from flash_attn_t.philox import dropout_keep_mask, keep_threshold, philox4x32


def words(*values):
    return torch.tensor(values, dtype=torch.int64)


def test_philox_known_answers():
    # (counter, key, output) from the generator's reference implementation's test vectors
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        assert philox4x32(words(*counter), key).tolist() == list(expected)


def test_keep_mask_statistics_and_reproducibility():
    mask = dropout_keep_mask(seed=1234, offset=8, batch=2, nheads=3, seqlen_q=64, seqlen_k=200, p_dropout=0.1)
    assert mask.shape == (2, 3, 64, 200)
    n = mask.numel()
    kept = mask.float().mean().item()
    assert abs(kept - 0.9) < 4 * (0.9 * 0.1 / n) ** 0.5  # within 4 standard deviations
    again = dropout_keep_mask(seed=1234, offset=8, batch=2, nheads=3, seqlen_q=64, seqlen_k=200, p_dropout=0.1)
    assert torch.equal(mask, again)
    other = dropout_keep_mask(seed=1234, offset=9, batch=2, nheads=3, seqlen_q=64, seqlen_k=200, p_dropout=0.1)
    assert (mask != other).float().mean().item() > 0.1  # a new offset draws a new mask


def test_keep_threshold_bounds():
    assert keep_threshold(1.0) == 65536 and keep_threshold(0.0) == 0 and keep_threshold(0.9) == 58982


def test_reference_dropout_zeroes_and_rescales_the_normalised_probabilities():
    """The reference's dropout: all kept at p = 0 is plain attention; otherwise out is
    (keep * softmax / (1 - p)) v with the same lse, batched and varlen alike."""
    from flash_attn_t.reference import attention_reference
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, dtype=torch.float64) for _ in range(3))
    plain_out, plain_lse = attention_reference(q, k, v, causal=True)
    all_kept = torch.ones(2, 3, 5, 5, dtype=torch.bool)
    out, lse = attention_reference(q, k, v, causal=True, dropout_p=0.0, dropout_keep=all_kept)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    keep = dropout_keep_mask(seed=7, offset=0, batch=2, nheads=3, seqlen_q=5, seqlen_k=5, p_dropout=0.3)
    out, lse = attention_reference(q, k, v, causal=True, dropout_p=0.3, dropout_keep=keep)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1) * keep / 0.7
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", probs, v))
    assert torch.equal(lse, plain_lse)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    varlen_out, _ = attention_reference(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                                        cu_seqlens_q=cu, cu_seqlens_k=cu, dropout_p=0.3, dropout_keep=keep)
    torch.testing.assert_close(varlen_out, out.flatten(0, 1))
