"""Sliding-window attention: time and TFLOP/s on the visited area (the (query, key) pairs inside
the window) against the plain causal kernel over the whole sequence, forward and backward.
SDPA has no sliding-window fused kernel (a window there is an explicit mask on the math or
efficient backend), so the comparison is with our own causal call on the same tensors.

    python benchmarks/benchmark_window.py [--seqlen 16384] [--windows 1024 4096] [--head-dim 128]
"""
import argparse

import torch

from benchmark_attention import Timer


def visited_pairs(seqlen, window):
    """(query, key) pairs of a causal window of `window` keys (the query's own and window - 1
    before it) over one sequence; window >= seqlen is plain causal."""
    window = min(window, seqlen)
    return window * (window + 1) // 2 + (seqlen - window) * window


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    from flash_attn_t import flash_attn_func

    heads, n, d = args.width // args.head_dim, args.seqlen, args.head_dim
    q, k, v = (torch.randn(1, n, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    timer = Timer(args.reps, warmup=3)
    print(f"sliding window, causal, 1 x {n} tokens, {heads} heads x {d}, bf16, {torch.cuda.get_device_name()}")
    print(f"{'window':>8} {'pass':>4} {'ms':>8} {'TFLOP/s':>8} {'time vs causal':>15} {'visited share':>14}")
    causal_ms = {}
    for window in [n] + args.windows:
        size = (window - 1, 0) if window < n else (-1, -1)
        for pass_name, factor in (("fwd", 1.0), ("bwd", 2.5)):
            out = flash_attn_func(q, k, v, causal=True, window_size=size)
            if pass_name == "fwd":
                ms = timer(lambda: flash_attn_func(q, k, v, causal=True, window_size=size))
            else:
                ms = timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
            pairs = visited_pairs(n, window)
            tflops = 4 * heads * d * pairs * factor / ms / 1e9
            causal_ms.setdefault(pass_name, ms)
            print(f"{window if window < n else 'causal':>8} {pass_name:>4} {ms:8.3f} {tflops:8.1f} "
                  f"{ms / causal_ms[pass_name]:15.2f} {pairs / visited_pairs(n, n):14.2f}")


if __name__ == "__main__":
    main()
