"""Decoding: query tokens against a KV cache, flash-attn-t's flash_attn_with_kvcache against torch
SDPA's backends, in one process: microseconds per call and the cache bytes read per second (K and
V of every sequence once: the memory-bound ideal reads them at HBM speed).

Per case (batch x cache length, query tokens per sequence, query / kv heads; bf16, the whole cache
valid): CUDA events, an L2 flush before each call, the backends interleaved within each round and
the rounds repeated (--rounds), median per backend. Before timing, each backend's output for the
first two sequences is checked against SDPA's math backend in fp32. One query token attends to
every key; several attend without a mask in every backend (SDPA's is_causal aligns top-left, not
at the cache's end as a decode step does; the mask changes nothing in the cost here).

    python benchmarks/benchmark_decode.py                      # three of issue 11's cases
    python benchmarks/benchmark_decode.py --grid --csv decode.csv  # issue 11's whole grid
    python benchmarks/benchmark_decode.py --cases 4x65536 --head-dim 64 --queries 1 4
    python benchmarks/benchmark_decode.py --page-sizes 16 256   # also the paged cache (pages shuffled)
    python benchmarks/benchmark_decode.py --splits 2 16          # also fixed split counts (the heuristic's A/B)
"""
import argparse
import csv
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchmark_attention import Timer  # noqa: E402
from kernel_times import kernel_times  # noqa: E402

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


# issue 11's grid: batch x cache length x query tokens x (query heads, kv heads), hd 128, with
# pages of 16 and 256 rows beside the contiguous cache
GRID = dict(cases=[f"{b}x{n}" for b, n in itertools.product((1, 8, 64), (4096, 8192, 32768, 131072))],
            queries=[1, 4], head_configs=["32/8", "32/32"], page_sizes=[16, 256])


def grid_cases(cases, queries, head_configs):
    """(batch, cache length, query tokens, heads, kv heads) of every combination, head configs
    outermost."""
    out = []
    for config, case, n_q in itertools.product(head_configs, cases, queries):
        heads, kv_heads = (int(x) for x in config.split("/"))
        batch, seqlen = (int(x) for x in case.split("x"))
        out.append((batch, seqlen, n_q, heads, kv_heads))
    return out


def cache_bytes(batch, seqlen, kv_heads, head_dim, element_size=2):
    """K and V of every sequence: what a decode step must read."""
    return 2 * batch * seqlen * kv_heads * head_dim * element_size


def fits(needed, free, fraction=0.6):
    """Whether a case's tensors (needed bytes) fit in a fraction of the free memory (the rest for
    the backends' workspaces and the reference)."""
    return needed <= fraction * free


def callables(q, k_cache, v_cache, page_sizes, splits=()):
    """{backend: fn} for q (batch, seqlen_q, heads, d) against the caches (batch, seqlen, heads_k,
    d), also read through block tables of each of page_sizes and with each fixed split count of
    splits. One query token: causal (bottom-right, as a decode step); several: no mask."""
    from flash_attn_t import flash_attn_with_kvcache
    batch, seqlen = k_cache.shape[:2]
    causal = q.shape[1] == 1
    lengths = torch.full((batch,), seqlen, dtype=torch.int32, device=q.device)
    fns = {"flash_attn_t": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                           causal=causal)}
    for n in splits:
        fns[f"fa_t_split{n}"] = (lambda n=n: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                                                      num_splits=n))
    for page_size in page_sizes:
        order = torch.randperm(batch * seqlen // page_size, device=q.device)
        (k_pool, table), (v_pool, _) = paged(k_cache, page_size, order), paged(v_cache, page_size, order)
        fns[f"fa_t_page{page_size}"] = (lambda k_pool=k_pool, v_pool=v_pool, table=table: flash_attn_with_kvcache(
            q, k_pool, v_pool, cache_seqlens=lengths, block_table=table, causal=causal))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))  # SDPA's (batch, heads, seq, d)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
        return run

    for name, backend in SDPA_BACKENDS.items():
        fns[name] = sdpa(backend)
    return fns


def reference(q, k_cache, v_cache, sequences=2):
    """SDPA's math backend in fp32 on the first `sequences` sequences (the whole batch's fp32 copy
    of the cache may not fit)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*(t[:sequences].transpose(1, 2).float() for t in (q, k_cache, v_cache)),
                                              enable_gqa=True).transpose(1, 2)


def run_case(batch, seqlen, n_q, heads, kv_heads, args, timer):
    """{backend: median us} of one case, printed; None when it does not fit in memory."""
    label = f"{batch}x{seqlen} q{n_q} {heads}/{kv_heads}"
    one_copy, free = cache_bytes(batch, seqlen, kv_heads, args.head_dim), torch.cuda.mem_get_info()[0]
    if not fits(one_copy, free):
        print(f"{label:>22} skipped: its {one_copy / 2**30:.0f} GiB cache does not fit")
        return None
    page_sizes = args.page_sizes if fits(one_copy * (1 + len(args.page_sizes)), free) else []
    if page_sizes != args.page_sizes:
        print(f"{label:>22} (no paged copies: {len(args.page_sizes)} more caches do not fit)")
    gen = torch.Generator(device="cuda").manual_seed(seqlen)
    q = torch.randn(batch, n_q, heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_cache, v_cache = (torch.randn(batch, seqlen, kv_heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                                    generator=gen) for _ in range(2))
    fns = callables(q, k_cache, v_cache, page_sizes, args.splits)
    expected = reference(q, k_cache, v_cache)
    usable = {}
    for name, fn in fns.items():
        try:
            err = (fn()[:2].float() - expected).abs().max().item()
        except RuntimeError as exc:  # an SDPA backend that does not take this shape
            print(f"{label:>22} {name:>15} {'n/a':>9}   ({str(exc).splitlines()[0][:60]})")
            continue
        if err > 2e-2:
            sys.exit(f"{name} at {label}: max error {err:.2e} against SDPA's math in fp32")
        usable[name] = fn
    times = {name: [] for name in usable}
    for _ in range(args.rounds):
        for name, fn in usable.items():
            times[name].append(timer(fn) * 1e3)
    median = {name: statistics.median(t) for name, t in times.items()}
    read = cache_bytes(batch, seqlen, kv_heads, args.head_dim)
    best_sdpa = min((t for name, t in median.items() if name.startswith("sdpa")), default=float("nan"))
    for name, us in median.items():
        vs_contiguous = f"{median['flash_attn_t'] / us:12.2f}x" if name.startswith("fa_t_page") else ""
        print(f"{label:>22} {name:>15} {us:>9.1f} {read / us / 1e3:>7.0f} {best_sdpa / us:>11.2f}x {vs_contiguous}")
    if args.kernels:  # (no L2 flush between these calls)
        for name, fn in usable.items():
            times = kernel_times([fn] * args.reps)
            print(f"{label:>22} {name:>15} kernels: " +
                  ", ".join(f"{us:.1f} us {kernel[:60]}" for kernel, us in times.items()))
    return median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["1x131072", "8x32768", "8x8192"], help="BATCHxCACHE_LEN")
    parser.add_argument("--queries", nargs="+", type=int, default=[1], help="query tokens per sequence")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-sizes", nargs="*", type=int, default=[], help="also read a paged cache")
    parser.add_argument("--splits", nargs="*", type=int, default=[], help="also fixed split counts")
    parser.add_argument("--grid", action="store_true", help="issue 11's grid (overrides the case options)")
    parser.add_argument("--csv", help="also write the medians here")
    parser.add_argument("--kernels", action="store_true", help="also each backend's GPU time per kernel (profiler)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    head_configs = [f"{args.heads}/{args.kv_heads}"]
    if args.grid:
        args.cases, args.queries, head_configs, args.page_sizes = (GRID[key] for key in
                                                                   ("cases", "queries", "head_configs", "page_sizes"))
    timer = Timer(args.reps, warmup=3)
    print(f"decode: head dim {args.head_dim}, bf16, {torch.cuda.get_device_name()}; us per call (median), "
          "cache GB/s")
    print(f"{'case':>22} {'backend':>15} {'us':>9} {'GB/s':>7} {'vs best SDPA':>12} {'vs contiguous':>13}")
    rows = []
    for batch, seqlen, n_q, heads, kv_heads in grid_cases(args.cases, args.queries, head_configs):
        median = run_case(batch, seqlen, n_q, heads, kv_heads, args, timer)
        torch.cuda.empty_cache()
        for name, us in (median or {}).items():
            rows.append(dict(batch=batch, cache=seqlen, queries=n_q, heads=heads, kv_heads=kv_heads, backend=name,
                             us=round(us, 2), gb_s=round(cache_bytes(batch, seqlen, kv_heads, args.head_dim) / us / 1e3)))
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
