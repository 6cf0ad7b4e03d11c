"""Trains a small causal transformer on one long sequence with the sequence split over W processes
(ring attention, flash_attn_t.distributed), and once on a single process, from the same weights on
the same data; prints the losses of both, tokens/s and peak memory per process, and exits non-zero
if the curves differ by more than --tolerance.

On GPUs (--device cuda, one per process, NCCL) attention runs on flash-attn-t's kernels in bf16;
on the CPU (--device cpu, gloo) on the exact reference in fp32, which checks the sharding of
inputs, targets and positions and the gradient reduction anywhere.

Each process holds the zigzag shard of the tokens, their targets and their global positions; the
model's parameters are replicated, so each process's loss is its share of the mean over all
tokens and the parameter gradients are summed over the processes (an all-reduce per step).

    python benchmarks/train_context_parallel.py --world 2                    # 2 GPUs, 32k tokens
    python benchmarks/train_context_parallel.py --device cpu --world 2 --seq-len 256 --steps 4 \\
        --dim 64 --heads 4 --kv-heads 2 --layers 2
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flash_attn_t.distributed import ring_flash_attn_func, shard_sequence


class Block(torch.nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x, group):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, -1, self.head_dim).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=2)
        attn = ring_flash_attn_func(q, k, v, group=group, causal=True, layout="zigzag")
        x = x + self.proj(attn.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class Model(torch.nn.Module):
    def __init__(self, vocab, dim, heads, kv_heads, layers, max_len):
        super().__init__()
        self.embed, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(max_len, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, positions, group):
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x, group)
        return self.head(x)


def data(args):
    """One long learnable sequence: a random walk over the vocabulary, repeated once."""
    gen = torch.Generator().manual_seed(args.seed)
    half = torch.cumsum(torch.randint(1, 4, (args.seq_len // 2 + 1,), generator=gen), 0) % args.vocab
    walk = torch.cat([half, half])[: args.seq_len + 1]
    return walk[:-1][None], walk[1:][None]  # tokens, next-token targets


def train(rank, world, rendezvous, args, results):
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=world)
    try:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        torch.manual_seed(args.seed)
        model = Model(args.vocab, args.dim, args.heads, args.kv_heads, args.layers, args.seq_len).to(device, dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        tokens, targets = data(args)
        positions = torch.arange(args.seq_len)[None]
        tokens, targets, positions = (shard_sequence(t, layout="zigzag").to(device) for t in (tokens, targets, positions))
        losses, start = [], None
        for step in range(args.steps):
            if step == args.warmup_steps:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            logits = model(tokens, positions, None)
            # this process's share of the mean over all tokens
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum") / args.seq_len
            optimizer.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item())
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start if start is not None else float("nan")
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if args.device == "cuda" else float("nan")
        if rank == 0:
            results.put((losses, (args.steps - args.warmup_steps) * args.seq_len / seconds, memory))
    finally:
        dist.destroy_process_group()


def spawn(fn, world, args):
    """Runs fn(rank, world, rendezvous_file, args, results) in `world` processes and returns the
    results queue (what rank 0 put there) once all have finished."""
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "rendezvous"), args, results), nprocs=world, join=True)
    return results


def run(world, args):
    return spawn(train, world, args).get()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest |loss difference| allowed (default 1e-4 on the CPU, 0.05 in bf16)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"--world {args.world} needs {args.world} GPUs, this machine has {torch.cuda.device_count()}")
    if args.seq_len % (2 * args.world):
        parser.error(f"--seq-len must be a multiple of 2 x --world ({2 * args.world}) for the zigzag layout")
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if args.device == "cpu" else 0.05)

    report = {world: run(world, args) for world in (1, args.world)}
    print(f"{'processes':>9} {'tokens/s':>10} {'peak GiB':>9} {'final loss':>11}")
    for world, (losses, rate, memory) in report.items():
        print(f"{world:>9} {rate:>10.0f} {memory:>9.2f} {losses[-1]:>11.4f}")
    gap = max(abs(a - b) for a, b in zip(report[1][0], report[args.world][0]))
    print(f"largest |loss difference| between 1 and {args.world} processes over {args.steps} steps: {gap:.2e} "
          f"(bound {tolerance:g})")
    return 0 if gap <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
