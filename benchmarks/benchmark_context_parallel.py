"""Ring attention (flash_attn_t.distributed) on 1 and W GPUs: forward, backward and forward +
backward time per sequence length, the speedup over one GPU, the share of the communication hidden
behind compute, and peak memory per GPU.

Per length and process count, in W spawned processes (one GPU each, NCCL): causal attention over
the whole sequence, zigzag shards (one GPU: flash_attn_func over the whole sequence), bf16, batch 1, --heads x --head-dim; CUDA events, an L2 flush
and a barrier before each rep, the slowest rank's time, median of --reps. The hidden share of the
forward's communication is (T_compute + T_comm - T_ring) / T_comm, with T_compute the same block
schedule without transfers (every step attends to the rank's own K/V shard, the same amount of
work) and T_comm the W - 1 K/V transfers alone.

    python benchmarks/benchmark_context_parallel.py --world 2 --seqlens 32768 131072 262144
    python benchmarks/benchmark_context_parallel.py --device cpu --world 2 --seqlens 64 --heads 2 \\
        --head-dim 16 --reps 2        # the script's logic only (gloo, the reference)
"""
import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

import flash_attn_t
from flash_attn_t import distributed

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_context_parallel import spawn  # noqa: E402


class _NoTransferRing(distributed._Ring):
    """The ring's block schedule without its transfers: each step keeps the K/V in hand."""

    def shift(self, tensors):
        return lambda: list(tensors)


def _timer(device, reps):
    flush = torch.empty(256 * 1024 * 1024 if device.type == "cuda" else 1, dtype=torch.uint8, device=device)

    def measure(fn):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            flush.zero_()
            dist.barrier()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                elapsed = torch.tensor(start.elapsed_time(end), device=device)
            else:
                begin = time.perf_counter()
                fn()
                elapsed = torch.tensor((time.perf_counter() - begin) * 1e3)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
            times.append(elapsed.item())
        return statistics.median(times)

    return measure


def worker(rank, world, rendezvous, args, results):
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        dtype = torch.bfloat16 if cuda else torch.float32
        measure = _timer(device, args.reps)
        ring, idle_ring = distributed._Ring(None, device), _NoTransferRing(None, device)
        scale = args.head_dim ** -0.5
        for seqlen in args.seqlens:
            local = seqlen // world
            gen = torch.Generator(device=device).manual_seed(seqlen)
            q = torch.randn(1, local, args.heads, args.head_dim, device=device, dtype=dtype, generator=gen)
            k, v = (torch.randn(1, local, args.kv_heads, args.head_dim, device=device, dtype=dtype, generator=gen)
                    for _ in range(2))
            dout = torch.randn_like(q)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def forward(ring_=ring):
                if world == 1 and cuda:  # one GPU: what a user runs there
                    return flash_attn_t.flash_attn_func(*leaves, softmax_scale=scale, causal=True)
                return distributed._RingAttention.apply(*leaves, ring_, scale, True, "zigzag", False)[0]

            out = forward()

            def backward():
                torch.autograd.grad(out, leaves, dout, retain_graph=True)

            def forward_backward():
                torch.autograd.grad(forward(), leaves, dout)

            times = {"fwd": measure(forward), "bwd": measure(backward), "fwd+bwd": measure(forward_backward)}
            if world > 1:
                times["fwd compute"] = measure(lambda: forward(idle_ring))
                times["fwd comm"] = measure(lambda: [ring.shift([k, v])() for _ in range(world - 1)])
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            if rank == 0:
                results.put((seqlen, times, memory))
            del out, leaves
        if rank == 0:
            results.put(None)
    finally:
        dist.destroy_process_group()


def run(world, args):
    results = spawn(worker, world, args)
    rows = {}
    while (item := results.get()) is not None:
        seqlen, times, memory = item
        rows[seqlen] = (times, memory)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"--world {args.world} needs {args.world} GPUs, this machine has {torch.cuda.device_count()}")
    for seqlen in args.seqlens:
        if seqlen % (2 * args.world):
            parser.error(f"--seqlens: {seqlen} is not a multiple of 2 x --world ({2 * args.world})")

    one, many = run(1, args), run(args.world, args)
    w = args.world
    print(f"causal, zigzag, batch 1, {args.heads} / {args.kv_heads} heads x {args.head_dim}, {args.device}; "
          "ms (slowest rank, median); peak GiB per process")
    print(f"{'seqlen':>8} {'pass':>8} {'1 proc':>9} {f'{w} procs':>9} {'speedup':>8} {'peak 1':>7} {f'peak {w}':>7}"
          f" {'comm hidden':>11}")
    for seqlen in args.seqlens:
        (t1, m1), (tw, mw) = one[seqlen], many[seqlen]
        comm = tw["fwd comm"]
        hidden = (tw["fwd compute"] + comm - tw["fwd"]) / comm if comm > 0 else float("nan")
        for name in ("fwd", "bwd", "fwd+bwd"):
            extra = f" {100 * hidden:>10.0f}%" if name == "fwd" else ""
            print(f"{seqlen:>8} {name:>8} {t1[name]:>9.2f} {tw[name]:>9.2f} {t1[name] / tw[name]:>7.2f}x {m1:>7.2f} "
                  f"{mw:>7.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
