"""TFLOP/s of flash-attn-t against torch SDPA's flash and cuDNN backends, side by side in one run.

Grid (the FlashAttention convention): 16k tokens per batch (batch = 16384 / seqlen), model width
2048 (heads = 2048 / head_dim), bf16, head_dim in {64, 128}, seqlen in {512 .. 16k}, causal on/off.
FLOPs: forward 4 * b * h * sq * sk * d (halved under causal); backward 2.5x; forward+backward 3.5x.
Timing: CUDA events around each call (GPU time: the host-side wrapper overhead is kept out by a
GPU sleep queued ahead), an L2 flush before each, warm-up first, median of --reps.

    python benchmarks/benchmark_attention.py            # full grid, CSV + PNG in benchmarks/results/
    python benchmarks/benchmark_attention.py --quick    # seqlen 2k and 8k only, fewer reps
"""
import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PASSES = ("fwd", "bwd", "fwd+bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, pass_name):
    forward = 4 * batch * heads * seqlen_q * seqlen_k * head_dim / (2 if causal else 1)
    return forward * PASS_FLOP_FACTOR[pass_name]


class Timer:
    """Median milliseconds of fn() over reps, each after an L2 flush, timed with CUDA events."""

    def __init__(self, reps, warmup):
        self.reps, self.warmup = reps, warmup
        self.flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush_buffer.zero_()
            # Keep the GPU busy while Python prepares the call, so the events time GPU work and
            # not the host-side overhead of one backend's wrapper against another's. ~2 ms: a
            # fwd+bwd call's forward wrapper plus autograd outran 0.5 ms now and then (the same
            # build's fwd+bwd at 16k tokens read 516-618 TFLOP/s run to run).
            torch.cuda._sleep(4_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def flash_attn_t_callables(q, k, v, causal):
    """(b, s, h, d) layout, the flash_attn convention."""
    from flash_attn_t import flash_attn_func

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qg, kg, vg, causal=causal)
    dout = torch.randn_like(out)

    def fwd():
        flash_attn_func(q, k, v, causal=causal)

    def bwd():
        torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

    def fwd_bwd():
        o = flash_attn_func(qg, kg, vg, causal=causal)
        torch.autograd.grad(o, (qg, kg, vg), dout)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def sdpa_callables(backend, q, k, v, causal):
    """torch SDPA on (b, h, s, d) views of the same tensors, one backend forced."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))

    def attend(a, b, c):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    out = attend(qg, kg, vg)
    dout = torch.randn_like(out)

    def fwd():
        attend(qt, kt, vt)

    def bwd():
        torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

    def fwd_bwd():
        o = attend(qg, kg, vg)
        torch.autograd.grad(o, (qg, kg, vg), dout)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def forcing_sm80(callables):
    """The same calls with FLASH_ATTN_T_FORCE_SM80=1 set around each: our sm80 kernels on Hopper,
    to compare them with the sm90 ones in one run, forward and backward."""

    def forced(fn):
        def run():
            os.environ["FLASH_ATTN_T_FORCE_SM80"] = "1"
            try:
                fn()
            finally:
                del os.environ["FLASH_ATTN_T_FORCE_SM80"]

        return run

    return {name: forced(fn) for name, fn in callables.items()}


BACKENDS = {
    "flash_attn_t": flash_attn_t_callables,
    "flash_attn_t_sm80": lambda q, k, v, c: forcing_sm80(flash_attn_t_callables(q, k, v, c)),
    "sdpa_flash": lambda q, k, v, c: sdpa_callables(SDPBackend.FLASH_ATTENTION, q, k, v, c),
    "sdpa_cudnn": lambda q, k, v, c: sdpa_callables(SDPBackend.CUDNN_ATTENTION, q, k, v, c),
}
PEERS = ("sdpa_flash", "sdpa_cudnn")


def run_grid(args):
    timer = Timer(args.reps, args.warmup)
    rows = []
    for head_dim in args.head_dims:
        for causal in (False, True):
            for seqlen in args.seqlens:
                batch, heads = args.tokens // seqlen, args.width // head_dim
                gen = torch.Generator(device="cuda").manual_seed(seqlen + head_dim)
                q, k, v = (
                    torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for _ in range(3)
                )
                for backend in args.backends:
                    try:
                        fns = BACKENDS[backend](q, k, v, causal)
                    except RuntimeError as err:  # a peer that does not support the shape
                        print(f"  {backend} skipped at d={head_dim} s={seqlen}: {str(err).splitlines()[0]}")
                        continue
                    for pass_name in args.passes:
                        ms = timer(fns[pass_name])
                        flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, pass_name)
                        rows.append(dict(backend=backend, variant=args.variant, hdim=head_dim, seqlen=seqlen,
                                         causal=int(causal), pass_=pass_name, ms=ms, tflops=flops / ms / 1e9))
                    del fns
                    torch.cuda.empty_cache()
                print(f"  done d={head_dim} causal={int(causal)} seqlen={seqlen}", flush=True)
    return rows


def print_table(rows, passes):
    """One line per cell: our TFLOP/s, each peer's, and the ratio to the best peer."""
    cells = sorted({(r["hdim"], r["causal"], r["seqlen"]) for r in rows})
    lookup = {(r["backend"], r["hdim"], r["causal"], r["seqlen"], r["pass_"]): r["tflops"] for r in rows}
    header = (f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'pass':>8} {'ours':>7} {'sm80':>7} {'flash':>7} "
              f"{'cudnn':>7} {'vs best':>8}")
    print(header)
    print("-" * len(header))
    for hdim, causal, seqlen in cells:
        for pass_name in passes:
            ours = lookup.get(("flash_attn_t", hdim, causal, seqlen, pass_name))
            ours_sm80 = lookup.get(("flash_attn_t_sm80", hdim, causal, seqlen, pass_name))
            peers = [lookup.get((p, hdim, causal, seqlen, pass_name)) for p in PEERS]
            best = max((p for p in peers if p), default=None)
            fmt = lambda x: f"{x:7.1f}" if x else f"{'-':>7}"
            ratio = f"{ours / best:7.2f}x" if ours and best else f"{'-':>8}"
            print(f"{hdim:>4} {causal:>6} {seqlen:>6} {pass_name:>8} {fmt(ours)} {fmt(ours_sm80)} {fmt(peers[0])} "
                  f"{fmt(peers[1])} {ratio}")


def write_csv(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["backend", "variant", "hdim", "seqlen", "causal", "pass", "ms", "tflops"])
        for r in rows:
            writer.writerow([r["backend"], r["variant"], r["hdim"], r["seqlen"], r["causal"], r["pass_"],
                             f"{r['ms']:.4f}", f"{r['tflops']:.1f}"])


def write_plot(rows, passes, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    hdims = sorted({r["hdim"] for r in rows})
    fig, axes = plt.subplots(len(hdims) * 2, len(passes), figsize=(5 * len(passes), 3.2 * 2 * len(hdims)),
                             squeeze=False)
    for i, hdim in enumerate(hdims):
        for c, causal in enumerate((0, 1)):
            for j, pass_name in enumerate(passes):
                ax = axes[2 * i + c][j]
                for backend in BACKENDS:
                    pts = sorted((r["seqlen"], r["tflops"]) for r in rows if r["backend"] == backend and
                                 r["hdim"] == hdim and r["causal"] == causal and r["pass_"] == pass_name)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
                ax.set_xscale("log", base=2)
                ax.set_title(f"hdim {hdim}, {'causal' if causal else 'non-causal'}, {pass_name}")
                ax.set_xlabel("seqlen")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
    fig.suptitle(f"{torch.cuda.get_device_name()} bf16, 16k tokens, width 2048")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seqlen 2k and 8k, 10 reps")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variant", default="default", help="label for this build (ablations)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seqlens, args.reps = [2048, 8192], 10
    if not torch.cuda.is_available():
        sys.exit("benchmark_attention.py needs a CUDA GPU; on a CPU-only machine try `python -m flash_attn_t.demo`.")

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    rows = run_grid(args)
    print_table(rows, args.passes)
    stem = f"attention_{args.variant}"
    write_csv(rows, args.out_dir / f"{stem}.csv")
    write_plot(rows, args.passes, args.out_dir / f"{stem}.png")
    print(f"csv: {args.out_dir / (stem + '.csv')}")


if __name__ == "__main__":
    main()
