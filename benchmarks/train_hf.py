"""Trains one small Llama-style model with transformers' eager and SDPA attention and with
flash-attn-t, and compares them: tokens/s, peak GPU memory and the loss curves.

Each backend starts from the same initial weights (one seeded model, its state dict loaded into a
fresh model per run) and sees the same batches (step i's batch comes from a generator seeded with
i), so the three loss curves should lie on top of each other up to bf16 rounding. The data is
learnable: each sequence is a random walk over the vocabulary (each token the previous one plus 1,
2, 3 or 5) followed by the same walk again, so the loss falls from ln(vocab) toward ln(4) as the
model learns the increments, and below that only by attending back to copy the second half. The
model is built from a random config (transformers' LlamaConfig + LlamaForCausalLM, nothing
downloaded), bf16 weights, AdamW.

Reported per backend: tokens/s over the steps after --warmup-steps (wall clock between CUDA
synchronizations), peak GPU memory (torch.cuda.max_memory_allocated), final loss, and the largest
|loss - eager loss| over all steps. The losses per step go to a CSV and a PNG in --out-dir. The
script exits non-zero if flash-attn-t's loss at any step differs from eager's by more than
--tolerance or twice SDPA's largest difference from eager, whichever is larger.

    python benchmarks/train_hf.py                               # 8 layers, 8 x 1024 tokens, 60 steps
    python benchmarks/train_hf.py --backends eager sdpa --device cpu --layers 2 --hidden 64 \\
        --heads 4 --kv-heads 2 --head-dim 16 --intermediate 128 --seq-len 64 --batch 2 --steps 5
"""
import argparse
import copy
import csv
import gc
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm  # a dependency of transformers
from transformers import LlamaConfig, LlamaForCausalLM

BACKENDS = ("eager", "sdpa", "flash_attn_t")
REFERENCE = "eager"
CHECKED = "flash_attn_t"
WALK_INCREMENTS = torch.tensor([1, 2, 3, 5])


def attn_implementation(backend):
    """The attn_implementation string transformers takes for a backend label."""
    if backend != "flash_attn_t":
        return backend
    try:
        from flash_attn_t.integrations.transformers import ATTN_IMPLEMENTATION, register
    except ImportError as err:
        sys.exit(f"cannot import flash_attn_t ({err}): install the package, or pass --backends eager sdpa")
    register()
    return ATTN_IMPLEMENTATION


def model_config(args):
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                       intermediate_size=args.intermediate, max_position_embeddings=args.seq_len, use_cache=False)


def build_model(config, implementation, dtype):
    # _from_config writes the implementation and dtype into the config it is given: pass a copy.
    return LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=implementation, dtype=dtype)


def initial_state_dict(config, seed):
    """The weights every run starts from: one fp32 model built under `seed`."""
    torch.manual_seed(seed)
    return build_model(config, "eager", torch.float32).state_dict()


def synthetic_batch(step, args, device):
    """Step `step`'s batch, the same for every run: per sequence a random walk of seq_len / 2
    tokens from a random start (increments drawn from WALK_INCREMENTS, modulo the vocabulary),
    then the same walk again."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    choices = torch.randint(len(WALK_INCREMENTS), (args.batch, args.seq_len // 2), generator=gen)
    start = torch.randint(args.vocab, (args.batch, 1), generator=gen)
    walk = (start + WALK_INCREMENTS[choices].cumsum(dim=1)) % args.vocab
    return torch.cat([walk, walk], dim=1).to(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(backend, implementation, config, state_dict, args):
    """Trains a fresh model with attention `implementation` from `state_dict` for args.steps
    steps; returns its losses, tokens/s and peak memory in GiB (None off CUDA)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, implementation, dtype)
    model.load_state_dict(state_dict)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in tqdm(range(args.steps), desc=f"{backend:>12}", leave=False):
        if step == args.warmup_steps:
            synchronize(device)
            start = time.perf_counter()
        input_ids = synthetic_batch(step, args, device)
        loss = model(input_ids=input_ids, labels=input_ids).loss  # the model shifts the labels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = (args.steps - args.warmup_steps) * args.batch * args.seq_len
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(losses=torch.stack(losses).tolist(), tokens_per_s=tokens / seconds, peak_gib=peak)


def max_deviation(results, backend):
    """max over steps of |loss - eager loss| (inf where either is NaN), or None without an eager run."""
    if REFERENCE not in results:
        return None
    pairs = zip(results[backend]["losses"], results[REFERENCE]["losses"])
    return max(math.inf if math.isnan(loss - reference) else abs(loss - reference) for loss, reference in pairs)


def print_table(results):
    header = f"{'backend':>12} {'tokens/s':>10} {'peak GiB':>9} {'final loss':>10} {'max |d eager|':>13}"
    print(header)
    print("-" * len(header))
    for backend, r in results.items():
        peak = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'-':>9}"
        deviation = max_deviation(results, backend)
        deviation = f"{deviation:13.4f}" if deviation is not None else f"{'-':>13}"
        print(f"{backend:>12} {r['tokens_per_s']:10.0f} {peak} {r['losses'][-1]:10.4f} {deviation}")


def write_csv(results, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *results])
        for step, losses in enumerate(zip(*(r["losses"] for r in results.values()))):
            writer.writerow([step, *(f"{loss:.6f}" for loss in losses)])
    print(f"csv: {path}")


def write_plot(results, title, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (backend, r), style in zip(results.items(), ("-", "--", ":")):  # curves that agree overlap
        ax.plot(range(len(r["losses"])), r["losses"], style, label=backend, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def check_agreement(results, tolerance):
    """True unless flash-attn-t's curve leaves eager's by more than the bound at some step: the
    larger of `tolerance` and twice SDPA's largest distance from eager (bf16 training drifts by
    rounding alone; SDPA, exact attention too, shows how far)."""
    if CHECKED not in results:
        return True
    deviation = max_deviation(results, CHECKED)
    if deviation is None:
        print(f"no {REFERENCE} run: the {CHECKED} loss curve was not checked")
        return True
    sdpa_deviation = max_deviation(results, "sdpa") if "sdpa" in results else None
    bound = tolerance if sdpa_deviation is None else max(tolerance, 2 * sdpa_deviation)
    agrees = deviation <= bound
    print(f"{CHECKED} vs {REFERENCE}: max |loss difference| {deviation:.4f} {'<=' if agrees else '>'} bound "
          f"{bound:.4f}: {'curves agree' if agrees else 'CURVES DIFFER'}")
    return agrees


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (fp32, no memory stats)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help=f"largest allowed |{CHECKED} loss - {REFERENCE} loss| at any step")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.seq_len % 2:
        parser.error("--seq-len must be even (the second half repeats the first)")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be at least 0 and less than --steps")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: pass --device cpu (with small sizes) for a smoke test")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    implementations = {backend: attn_implementation(backend) for backend in args.backends}
    config = model_config(args)
    state_dict = initial_state_dict(config, args.seed)
    parameters = sum(t.numel() for t in state_dict.values()) / 1e6
    title = (f"{device_name}: Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
             f"{parameters:.1f}M params, {args.batch} x {args.seq_len} tokens, lr {args.lr}")
    print(f"{title}\ntorch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    results = {}
    for backend, implementation in implementations.items():
        results[backend] = train(backend, implementation, config, state_dict, args)
        print(f"  done {backend}", flush=True)
    print_table(results)
    write_csv(results, args.out_dir / "train_hf_losses.csv")
    write_plot(results, title, args.out_dir / "train_hf_losses.png")
    if not check_agreement(results, args.tolerance):
        sys.exit(1)


if __name__ == "__main__":
    main()
