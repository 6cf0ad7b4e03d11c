"""Host time per call of the decode entry points beside SDPA's: a small model's decode step is
bound by the host (Python, the dispatcher, launches), not by the GPU, so this is what decides its
tokens/s. Each entry point runs --calls times without a sync in between on a decode shape small
enough that the GPU keeps up (then the wall time per call is the host's); --profile adds the
Python functions that take the most time in our two entry points (cProfile).

    python benchmarks/host_overhead.py [--batch 1] [--cache 1024] [--heads 16] [--kv-heads 4]
                                       [--head-dim 64] [--profile]
"""
import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from flash_attn_t import decode, flash_attn_func, flash_attn_with_kvcache
from flash_attn_t.integrations import transformers as integration


def per_call_us(fn, calls):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    b, n, h, hk, d = args.batch, args.cache, args.heads, args.kv_heads, args.head_dim
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, 1, h, d, device=dev, dtype=dt)
    k_cache, v_cache = (torch.randn(b, n, hk, d, device=dev, dtype=dt) for _ in range(2))
    seqlens = torch.full((b,), n, dtype=torch.int32, device=dev)
    leftpad = torch.zeros(b, dtype=torch.int32, device=dev)
    ranges = torch.stack([leftpad, seqlens], dim=1).view(-1, 1, 1, 2)
    # transformers' layout: (batch, heads, seq, head_dim)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))

    class Module:
        is_causal = True

    cases = {
        "flash_attn_with_kvcache": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                                   cache_leftpad=leftpad, causal=True),
        "flash_attn_func": lambda: flash_attn_func(q, k_cache, v_cache, causal=True),
        "integration, key ranges": lambda: integration.attention_forward(Module(), qt, kt, vt, ranges),
        "integration, no mask": lambda: integration.attention_forward(Module(), qt, kt, vt, None),
        "fwd_kvcache + merge ops": lambda: torch.ops.flash_attn_t.merge_splits(
            *torch.ops.flash_attn_t.fwd_kvcache(decode._packed_rows(q, hk),
                                                k_cache, v_cache, seqlens, None, leftpad, d ** -0.5, False,
                                                num_splits=2), 2, h // hk),
        "sdpa (enable_gqa)": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
    }
    print(f"host time per call, b{b} x {n} keys, {h} / {hk} heads x {d}, bf16, one query token "
          f"({torch.cuda.get_device_name()})")
    for name, fn in cases.items():
        print(f"{name:>26}: {per_call_us(fn, args.calls):7.1f} us")
    if args.profile:
        for name in ("flash_attn_with_kvcache", "flash_attn_func", "integration, key ranges"):
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(500):
                cases[name]()
            profiler.disable()
            torch.cuda.synchronize()
            print(f"\n== {name}: 500 calls, by own time")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
