"""Per-kernel GPU time of one backward call, flash-attn-t beside SDPA's cuDNN and flash backends:
which share of a backward the main kernel takes and which the small passes around it (the D
pre-pass, the dQ conversion). torch.profiler, averaged over --reps calls, on the grid's shapes
(16k tokens, width 2048, bf16).

    python benchmarks/kernel_times.py [--head-dims 64 128] [--seqlens 2048 16384] [--causal 0 1]
"""
import argparse
import collections

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from flash_attn_t import flash_attn_func


def kernel_times(calls):
    """{kernel name: mean GPU microseconds per call} of the zero-argument callables `calls`, each
    run once under the profiler (warm them up first)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for call in calls:
            call()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
    return {name: us / len(calls) for name, us in totals.most_common()}


def backward_kernel_times(make_out, inputs, reps):
    """{kernel name: mean microseconds per call} of the backward of make_out(*inputs)."""
    outs = [make_out(*inputs) for _ in range(reps + 1)]
    grads = [torch.randn_like(o) for o in outs]
    # autograd.grad, not backward(): no accumulation into the leaves' .grad (an add kernel).
    torch.autograd.grad(outs[0], inputs, grads[0])  # warm-up
    return kernel_times([lambda o=o, g=g: torch.autograd.grad(o, inputs, g) for o, g in zip(outs[1:], grads[1:])])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for hd in args.head_dims:
        for seqlen in args.seqlens:
            for causal in args.causal:
                shape = (16384 // seqlen, seqlen, 2048 // hd, hd)
                q, k, v = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3)]
                backends = {"flash_attn_t": lambda q, k, v: flash_attn_func(q, k, v, causal=bool(causal))}
                for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                    def sdpa(q, k, v, backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                  v.transpose(1, 2), is_causal=bool(causal))
                    backends[label] = sdpa
                print(f"\nhd {hd}, seqlen {seqlen}, causal {causal}: backward kernels, us per call")
                for label, fn in backends.items():
                    times = backward_kernel_times(fn, (q, k, v), args.reps)
                    total = sum(times.values())
                    print(f"  {label}: {total:8.1f} us in all")
                    for name, us in times.items():
                        print(f"    {us:8.1f} us {100 * us / total:5.1f}%  {name[:110]}")


if __name__ == "__main__":
    main()
