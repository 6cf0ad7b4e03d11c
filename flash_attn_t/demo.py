"""A CPU demo of what the kernels compute, for machines without a GPU: the exact reference
attention on a small causal GQA batch, checked against a plain softmax written out here.

    python -m flash_attn_t.demo
"""
import torch

from .reference import attention_reference


def main():
    torch.manual_seed(0)
    batch, seqlen_q, seqlen_k, heads, heads_k, head_dim = 2, 5, 7, 4, 2, 64
    q = torch.randn(batch, seqlen_q, heads, head_dim)
    k = torch.randn(batch, seqlen_k, heads_k, head_dim)
    v = torch.randn(batch, seqlen_k, heads_k, head_dim)
    out, lse = attention_reference(q, k, v, causal=True)

    # the same thing spelled out: softmax(q k^T / sqrt(d)) v, keys j <= i + seqlen_k - seqlen_q
    kr = k.double().repeat_interleave(heads // heads_k, dim=2)
    vr = v.double().repeat_interleave(heads // heads_k, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kr) / head_dim**0.5
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    naive = torch.einsum("bhqk,bkhd->bqhd", probs, vr)

    print(f"q {tuple(q.shape)}, k/v {tuple(k.shape)} (GQA {heads}:{heads_k}), causal, bottom-right aligned")
    print(f"out {tuple(out.shape)}, lse {tuple(lse.shape)}")
    print(f"max |reference - naive softmax| = {(out - naive).abs().max().item():.2e}")
    print("The CUDA kernels compute the same function on an NVIDIA GPU (sm80 or newer): bash run.sh bench")


if __name__ == "__main__":
    main()
