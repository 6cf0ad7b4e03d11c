"""Decoding: one query token per sequence against a KV cache, flash-attn-t's flash_attn_with_kvcache
against torch SDPA's backends, in one process: microseconds per call and the cache bytes read per
second (K and V of every sequence once: the memory-bound ideal reads them at HBM speed).

Per case (batch x cache length, 32 query / 8 kv heads of 128 by default, bf16, the whole cache
valid): CUDA events, an L2 flush before each call, the backends interleaved within each round and
the rounds repeated (--rounds), median per backend. Before timing, each backend's output is
checked against SDPA's math backend in fp32.

    python benchmarks/benchmark_decode.py                      # issue 11's cases
    python benchmarks/benchmark_decode.py --cases 4x65536 --head-dim 64
    python benchmarks/benchmark_decode.py --page-sizes 16 256   # also the paged cache (pages shuffled)
    python benchmarks/benchmark_decode.py --splits 2 16          # also fixed split counts (the heuristic's A/B)
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchmark_attention import Timer  # noqa: E402

SDPA_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def paged(cache, page_size, order):
    """The cache (batch, seqlen, heads_k, d) as pages (batch x seqlen / page_size, page_size, heads_k, d)
    stored in the shuffled order `order` (a permutation of the pages), and its block table."""
    batch, seqlen = cache.shape[:2]
    pages = cache.reshape(batch * seqlen // page_size, page_size, *cache.shape[2:])
    pool = torch.empty_like(pages)
    pool[order] = pages
    return pool, order.reshape(batch, seqlen // page_size).to(torch.int32)


def callables(q, k_cache, v_cache, page_sizes, splits=()):
    """{backend: fn} for q (batch, 1, heads, d) against the caches (batch, seqlen, heads_k, d), also
    read through block tables of each of page_sizes and with each fixed split count of splits."""
    from flash_attn_t import flash_attn_with_kvcache
    batch, seqlen = k_cache.shape[:2]
    lengths = torch.full((batch,), seqlen, dtype=torch.int32, device=q.device)
    fns = {"flash_attn_t": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True)}
    for n in splits:
        fns[f"fa_t_split{n}"] = (lambda n=n: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                                      num_splits=n))
    for page_size in page_sizes:
        order = torch.randperm(batch * seqlen // page_size, device=q.device)
        (k_pool, table), (v_pool, _) = paged(k_cache, page_size, order), paged(v_cache, page_size, order)
        fns[f"fa_t_page{page_size}"] = (lambda k_pool=k_pool, v_pool=v_pool, table=table: flash_attn_with_kvcache(
            q, k_pool, v_pool, cache_seqlens=lengths, block_table=table, causal=True))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))  # SDPA's (batch, heads, seq, d)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
        return run

    for name, backend in SDPA_BACKENDS.items():
        fns[name] = sdpa(backend)
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["1x131072", "8x32768", "8x8192"], help="BATCHxCACHE_LEN")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-sizes", nargs="*", type=int, default=[], help="also read a paged cache")
    parser.add_argument("--splits", nargs="*", type=int, default=[], help="also fixed split counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    timer = Timer(args.reps, warmup=3)
    print(f"decode: 1 query token, {args.heads} / {args.kv_heads} heads x {args.head_dim}, bf16, "
          f"{torch.cuda.get_device_name()}; us per call (median), cache GB/s")
    print(f"{'case':>10} {'backend':>15} {'us':>9} {'GB/s':>7} {'vs best SDPA':>12} {'vs contiguous':>13}")
    for case in args.cases:
        batch, seqlen = (int(x) for x in case.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(seqlen)
        q = torch.randn(batch, 1, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k_cache, v_cache = (torch.randn(batch, seqlen, args.kv_heads, args.head_dim, device="cuda",
                                        dtype=torch.bfloat16, generator=gen) for _ in range(2))
        fns = callables(q, k_cache, v_cache, args.page_sizes, args.splits)
        with sdpa_kernel(SDPBackend.MATH):
            expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k_cache, v_cache)),
                                                      enable_gqa=True).transpose(1, 2)
        usable = {}
        for name, fn in fns.items():
            try:
                err = (fn().float() - expected).abs().max().item()
            except RuntimeError as exc:  # an SDPA backend that does not take this shape
                print(f"{case:>10} {name:>15} {'n/a':>9}   ({str(exc).splitlines()[0][:60]})")
                continue
            if err > 2e-2:
                sys.exit(f"{name} at {case}: max error {err:.2e} against SDPA's math in fp32")
            usable[name] = fn
        times = {name: [] for name in usable}
        for _ in range(args.rounds):
            for name, fn in usable.items():
                times[name].append(timer(fn) * 1e3)
        median = {name: statistics.median(t) for name, t in times.items()}
        cache_bytes = 2 * k_cache.numel() * k_cache.element_size()
        best_sdpa = min((t for name, t in median.items() if name.startswith("sdpa")), default=float("nan"))
        for name, us in median.items():
            vs_contiguous = f"{median['flash_attn_t'] / us:12.2f}x" if name.startswith("fa_t_page") else ""
            print(f"{case:>10} {name:>15} {us:>9.1f} {cache_bytes / us / 1e3:>7.0f} {best_sdpa / us:>11.2f}x {vs_contiguous}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
