"""Ring attention (flash_attn_t.distributed): on the CPU with the gloo backend and the exact
reference as the local attention, against attention over the whole sequence -- the merge and the
communication schedule, everywhere; on two GPUs with NCCL and the kernels, against one GPU's."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flash_attn_t import distributed
from flash_attn_t.reference import attention_reference


def _spawn(worker, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "rendezvous"), *args), nprocs=world, join=True)


def _init(rank, world, rendezvous, backend):
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _full_inputs(batch, seqlen, heads, heads_k, head_dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seqlen, heads, head_dim), (batch, seqlen, heads_k, head_dim), (batch, seqlen, heads_k, head_dim),
              (batch, seqlen, heads, head_dim)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def _ring(q, k, v, dout, layout, causal, group=None):
    """Shards the full inputs, runs the ring forward and backward, gathers out, lse and grads."""
    shards = [distributed.shard_sequence(t, group, layout).requires_grad_() for t in (q, k, v)]
    out, lse, _ = distributed.ring_flash_attn_func(*shards, group=group, causal=causal, layout=layout,
                                                   return_attn_probs=True)
    out.backward(distributed.shard_sequence(dout, group, layout))
    gather = lambda t, dim=1: distributed.unshard_sequence(t.detach(), group, layout, dim)  # noqa: E731
    return gather(out), gather(lse, 2), [gather(t.grad) for t in shards]


def _cpu_worker(rank, world, rendezvous):
    _init(rank, world, rendezvous, "gloo")
    try:
        for layout in distributed.LAYOUTS:
            for causal in (False, True):
                for heads, heads_k in ((2, 2), (4, 2)):
                    q, k, v, dout = _full_inputs(2, 12, heads, heads_k, 16, torch.float64, "cpu", seed=world + heads)
                    out, lse, grads = _ring(q, k, v, dout, layout, causal)
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    ref_out, ref_lse = attention_reference(*leaves, causal=causal)
                    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
                    case = f"world {world} {layout} causal={causal} heads {heads}/{heads_k}"
                    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=case)
                    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10, msg=case)
                    for name, g, ref_g in zip("qkv", grads, ref_grads):
                        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-9, msg=f"d{name}: {case}")
        # a DeviceMesh names the group; fp32 inputs run the reference in fp32
        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        q, k, v, dout = _full_inputs(1, 8 * world, 4, 1, 32, torch.float32, "cpu", seed=7)
        out, _, grads = _ring(q, k, v, dout, "zigzag", True, group=mesh)
        ref_out, _ = attention_reference(q, k, v, causal=True)
        torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-5)
        # bad input: clear errors
        shard = torch.zeros(1, 3, 2, 16)
        with pytest.raises(ValueError, match="seqlen_local must be even"):
            distributed.ring_flash_attn_func(shard, shard, shard, layout="zigzag")
        with pytest.raises(ValueError, match="layout must be one of"):
            distributed.ring_flash_attn_func(shard, shard, shard, layout="striped")
        with pytest.raises(ValueError, match="does not split into the"):
            distributed.shard_sequence(torch.zeros(1, 5, 2, 16), layout="contiguous")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_on_cpu_matches_whole_sequence_attention(world):
    _spawn(_cpu_worker, world)


def _gpu_worker(rank, world, rendezvous, head_dim, dtype):
    torch.cuda.set_device(rank)
    _init(rank, world, rendezvous, "nccl")
    from conftest import assert_close_to_ref
    from flash_attn_t import flash_attn_func
    try:
        for layout in distributed.LAYOUTS:
            for causal in (False, True):
                # 1000 tokens per rank pair: not a multiple of the kernels' 128-row blocks
                q, k, v, dout = _full_inputs(2, 1000, 8, 2, head_dim, dtype, f"cuda:{rank}", seed=head_dim)
                out, lse, grads = _ring(q, k, v, dout, layout, causal)
                _, one_lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
                results = []
                for compute in (torch.float64, dtype):
                    ref_leaves = [t.detach().to(compute).requires_grad_() for t in (q, k, v)]
                    ref_out, _ = attention_reference(*ref_leaves, causal=causal, compute_dtype=compute)
                    results.append((ref_out, torch.autograd.grad(ref_out, ref_leaves, dout.to(compute))))
                (ref_out, ref_grads), (pt_out, pt_grads) = results
                assert_close_to_ref(out, ref_out, pt_out, f"out {layout} causal={causal}")
                torch.testing.assert_close(lse, one_lse, rtol=1e-5, atol=1e-5)
                for name, g, ref_g, pt_g in zip("qkv", grads, ref_grads, pt_grads):
                    assert_close_to_ref(g, ref_g, pt_g, f"d{name} {layout} causal={causal}")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ring_attention_on_two_gpus_matches_the_reference(head_dim):
    from flash_attn_t import ops
    if not ops.extension_available():
        pytest.skip("flash_attn_t._C is not built")
    _spawn(_gpu_worker, 2, head_dim, torch.bfloat16)


def _run_benchmark_script(name, *args):
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", name)
    if not os.path.exists(script):
        pytest.skip("benchmarks/ is not beside tests/ (an installed-package test run)")
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_context_parallel_benchmark_runs_on_cpu():
    """benchmarks/benchmark_context_parallel.py's logic (on the CPU its timings mean nothing)."""
    out = _run_benchmark_script("benchmark_context_parallel.py", "--device", "cpu", "--world", "2", "--seqlens", "64",
                                "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--reps", "1")
    for name in ("fwd", "bwd", "fwd+bwd"):
        assert f"      64 {name:>8}" in out, out


def test_context_parallel_training_example_matches_one_process_on_cpu():
    """benchmarks/train_context_parallel.py: a small causal transformer trained on one sequence
    split over 2 gloo processes follows the one-process loss curve (its exit status says so)."""
    out = _run_benchmark_script("train_context_parallel.py", "--device", "cpu", "--world", "2", "--seq-len", "64",
                                "--steps", "3", "--warmup-steps", "1", "--dim", "32", "--heads", "4", "--kv-heads", "2",
                                "--layers", "2")
    assert "largest |loss difference| between 1 and 2 processes" in out
