"""CPU: the Philox4x32-10 reference against the generator's published known-answer vectors, and
the dropout keep mask's statistics."""
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
