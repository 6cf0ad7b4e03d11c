"""Rotary position embedding, as flash_attn_with_kvcache applies it to q and the new k.

cos, sin: (seqlen_ro, rotary_dim / 2) tables indexed by position; the first rotary_dim channels of
each head are rotated in pairs, computed in fp32 and rounded once to the input dtype:
  interleaved=True:  channels (0, 1), (2, 3), ... (GPT-J style);
  interleaved=False: channels (i, i + rotary_dim / 2) (GPT-NeoX style).
"""
import torch


def apply_rotary(x, cos, sin, positions, interleaved):
    """x: (batch, seqlen, nheads, headdim) rotated at positions (batch, seqlen) (int, on x's
    device; the caller keeps them inside the tables). Returns a new tensor of x's dtype."""
    half = cos.shape[-1]
    cos, sin = (t[positions].float()[:, :, None, :] for t in (cos, sin))  # (batch, seqlen, 1, half)
    rotated, rest = x[..., :2 * half].float(), x[..., 2 * half:]
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)
