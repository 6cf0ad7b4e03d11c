"""Greedy generation with one small Llama-style model under transformers' eager and SDPA attention
and flash-attn-t: prefill time, decode tokens/s and latency per token, with transformers'
DynamicCache, a StaticCache run eagerly, and a StaticCache with the forward compiled (--caches).

One seeded random model (transformers' LlamaConfig + LlamaForCausalLM, nothing downloaded, bf16)
whose state dict is loaded into a fresh model per backend; every backend generates
--new-tokens tokens after the same random prompt of --prompt tokens per sequence (batch --batch),
with min_new_tokens = max_new_tokens so all run the same number of steps. Times are wall clock
between CUDA synchronisations, median of --reps runs after one warm-up, the backends interleaved
rep by rep (this decoding is host-bound, and the host drifts): the prefill alone (one new token)
and the whole generation; decode = whole - prefill. Also printed: the share of the
generated tokens equal to the first backend's (bf16 near-ties may differ).

    python benchmarks/generate_hf.py                        # 8 layers, batch 1 and 8, 2k prompt
    python benchmarks/generate_hf.py --caches dynamic static static_compiled
    python benchmarks/generate_hf.py --device cpu --backends eager sdpa --layers 2 --hidden 64 \\
        --heads 4 --kv-heads 2 --head-dim 16 --prompt 32 --new-tokens 8 --batch 2 --reps 1
"""
import argparse
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_hf import BACKENDS, attn_implementation  # noqa: E402


# generate's keyword arguments per cache: transformers compiles the forward by itself for a
# StaticCache on a GPU (mode "reduce-overhead") unless told not to
CACHES = {"dynamic": {}, "static": dict(cache_implementation="static", disable_compile=True),
          "static_compiled": dict(cache_implementation="static")}


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def generation(config, weights, backend, prompt, device, dtype, cache):
    """generate(new tokens) -> token ids, for a fresh model with `backend`'s attention."""
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation(backend))
    model.load_state_dict(weights)
    model.to(device, dtype).eval()

    def generate(new):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0, **CACHES[cache])
    return generate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--caches", nargs="+", default=["dynamic"], choices=CACHES)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         intermediate_size=args.intermediate, max_position_embeddings=args.prompt + args.new_tokens)
    torch.manual_seed(0)
    weights = LlamaForCausalLM(config).to(dtype).state_dict()

    print(f"{args.layers} layers, hidden {args.hidden}, {args.heads} / {args.kv_heads} heads x {args.head_dim}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, {args.device} {str(dtype).split('.')[-1]}")
    same_as = f"same as {args.backends[0]}"
    print(f"{'batch':>5} {'cache':>15} {'backend':>13} {'prefill ms':>10} {'decode tok/s':>12} {'ms / step':>9} {same_as:>15}")
    for batch in args.batch:
        prompt = torch.randint(0, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        prompt = prompt.to(device)
        reference = None
        for cache in args.caches:
            torch._dynamo.reset()
            runs = {backend: generation(config, weights, backend, prompt, device, dtype, cache)
                    for backend in args.backends}
            for run in runs.values():  # warm-up (and, for a compiled cache, compilation)
                run(1), run(args.new_tokens)
            times = {backend: ([], []) for backend in args.backends}
            generated = {}
            for _ in range(args.reps):  # backends interleaved rep by rep: drift hits them alike
                for backend, run in runs.items():
                    times[backend][0].append(timed(lambda: run(1), device)[0])
                    whole, generated[backend] = timed(lambda: run(args.new_tokens), device)
                    times[backend][1].append(whole)
            for backend, (prefills, wholes) in times.items():
                prefill, whole = statistics.median(prefills), statistics.median(wholes)
                steps = args.new_tokens - 1
                decode = max(whole - prefill, 1e-9)
                tokens = generated[backend][:, args.prompt:]
                reference = tokens if reference is None else reference
                same = (tokens == reference).float().mean().item()
                print(f"{batch:>5} {cache:>15} {backend:>13} {1e3 * prefill:>10.1f} {batch * steps / decode:>12.0f} "
                      f"{1e3 * decode / steps:>9.2f} {100 * same:>14.0f}%")
            del runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
