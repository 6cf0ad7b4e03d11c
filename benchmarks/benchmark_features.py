"""The attention variants against the plain kernel, same tensors, same run, interleaved round by
round (median of the rounds' medians):

  window:  a causal sliding window (--window keys) on --window-seqlen tokens, TFLOP/s counted on
           the visited (query, key) pairs, against plain causal attention over the whole sequence.
           SDPA has no fused sliding-window kernel, so the reference is our own causal call.
  softcap, alibi, sinks, dropout: softcap=30 (Gemma 2's value), ALiBi slopes, a learnable sink
           per head and dropout_p=0.1, at --seqlen tokens, causal and not: their time against the
           plain kernel's (the cost of the feature), with SDPA's cuDNN backend on the plain problem
           for scale (it has none of them).

    python benchmarks/benchmark_features.py [--seqlen 8192] [--window-seqlen 16384] [--window 4096]
        [--variants window alibi]     (a subset; the plain kernel and cuDNN are always timed)
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmark_attention import Timer

PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5}
VARIANTS = ("window", "softcap", "alibi", "sinks", "dropout")


def visited_pairs(seqlen, window):
    """(query, key) pairs of a causal window of `window` keys (the query's own and window - 1
    before it) over one sequence; window >= seqlen is plain causal."""
    window = min(window, seqlen)
    return window * (window + 1) // 2 + (seqlen - window) * window


def ours(q, k, v, dout, **variant):
    """(fwd, bwd) callables of flash_attn_func with the variant's keywords."""
    from flash_attn_t import flash_attn_func

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    sink = variant.pop("sink", None)
    if sink is not None:
        sink = sink.detach().requires_grad_()
        leaves.append(sink)
    out = flash_attn_func(*leaves[:3], **variant, **(dict(learnable_sink=sink) if sink is not None else {}))
    fwd_extra = dict(learnable_sink=sink.detach()) if sink is not None else {}
    return (lambda: flash_attn_func(q, k, v, **variant, **fwd_extra),
            lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))


def cudnn(q, k, v, dout, causal):
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    dout_t = dout.transpose(1, 2)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return fwd, lambda: torch.autograd.grad(out, (qt, kt, vt), dout_t, retain_graph=True)


def inputs(batch, seqlen, heads, head_dim):
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    return q, k, v, dout


def interleaved(cases, timer, rounds):
    """{(name, pass): median over rounds of each round's median ms}, every case timed once per
    round in turn."""
    times = {}
    for _ in range(rounds):
        for name, (fwd, bwd) in cases.items():
            for pass_name, fn in (("fwd", fwd), ("bwd", bwd)):
                times.setdefault((name, pass_name), []).append(timer(fn))
    return {key: statistics.median(ms) for key, ms in times.items()}


def window_section(args, timer):
    n, heads, d = args.window_seqlen, args.width // args.head_dim, args.head_dim
    q, k, v, dout = inputs(1, n, heads, d)
    cases = {"causal": ours(q, k, v, dout, causal=True),
             f"window {args.window}": ours(q, k, v, dout, causal=True, window_size=(args.window - 1, 0))}
    times = interleaved(cases, timer, args.rounds)
    print(f"\nsliding window, causal, 1 x {n} tokens, {heads} heads x {d}, bf16; TFLOP/s on the visited pairs")
    print(f"{'case':>14} {'pass':>4} {'ms':>8} {'TFLOP/s':>8} {'vs causal':>10} {'time share':>11} {'pair share':>11}")
    for pass_name, factor in PASS_FLOP_FACTOR.items():
        base = None
        for name, window in (("causal", n), (f"window {args.window}", args.window)):
            ms, pairs = times[(name, pass_name)], visited_pairs(n, window)
            tflops = 4 * heads * d * pairs * factor / ms / 1e9
            base = base or (tflops, ms)
            print(f"{name:>14} {pass_name:>4} {ms:8.3f} {tflops:8.1f} {tflops / base[0]:10.2f} "
                  f"{ms / base[1]:11.2f} {pairs / visited_pairs(n, n):11.2f}")


def cost_section(args, timer):
    n, d = args.seqlen, args.head_dim
    heads, batch = args.width // d, max(1, 16384 // n)
    q, k, v, dout = inputs(batch, n, heads, d)
    sink = torch.linspace(-1.0, 2.0, heads, device="cuda")
    slopes = 2.0 ** -torch.linspace(0.5, 8.0, heads, device="cuda")
    print(f"\nsoftcap, alibi, sinks and dropout, {batch} x {n} tokens, {heads} heads x {d}, bf16; "
          "time against the plain kernel")
    print(f"{'case':>14} {'causal':>6} {'pass':>4} {'ms':>8} {'TFLOP/s':>8} {'cost':>7}")
    for causal in (False, True):
        variants = {"softcap": ("softcap 30", dict(softcap=30.0)),
                    "alibi": ("alibi", dict(alibi_slopes=slopes)),
                    "sinks": ("sinks", dict(sink=sink)),
                    "dropout": ("dropout 0.1", dict(dropout_p=0.1))}
        cases = {"plain": ours(q, k, v, dout, causal=causal)}
        for name, keywords in (variants[key] for key in variants if key in args.variants):
            cases[name] = ours(q, k, v, dout, causal=causal, **keywords)
        cases["cuDNN plain"] = cudnn(q, k, v, dout, causal)
        times = interleaved(cases, timer, args.rounds)
        for pass_name, factor in PASS_FLOP_FACTOR.items():
            flops = 4 * batch * heads * n * n * d * factor / (2 if causal else 1)
            plain = times[("plain", pass_name)]
            for name in cases:
                ms = times[(name, pass_name)]
                print(f"{name:>14} {str(causal):>6} {pass_name:>4} {ms:8.3f} {flops / ms / 1e9:8.1f} "
                      f"{ms / plain - 1:+7.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--window-seqlen", type=int, default=16384)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, {args.rounds} interleaved rounds of {args.reps} reps")
    timer = Timer(args.reps, warmup=3)
    if "window" in args.variants:
        window_section(args, timer)
    if set(args.variants) - {"window"}:
        cost_section(args, timer)


if __name__ == "__main__":
    main()
