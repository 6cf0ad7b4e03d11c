"""Context parallelism: exact ring attention over torch.distributed, for sequences longer than one
GPU holds.

Each rank of a process group holds a shard of the sequence, (batch, seqlen_local, heads, dim).
The K/V shards travel around the ring (point-to-point, the next transfer in flight while the
block in hand is computed); each rank attends its queries to every block in turn and merges the
partial outputs exactly through their log-sum-exp, in fp32. The backward sends K/V around again;
the dK/dV partials a rank computes for another rank's block are sent straight back to that rank
(in the kernels' dtype, while the next block is computed) and summed there in fp32. P is
recomputed from the final lse, so every partial gradient is exact.

Layouts of the shards (shard_sequence / unshard_sequence):
  contiguous: rank r holds tokens [r s, (r + 1) s);
  zigzag:     the sequence is cut into 2 W chunks and rank r holds chunks r and 2 W - 1 - r, so
              under a causal mask every rank does the same work at every step.

On CUDA tensors the local attention is flash-attn-t's kernels (fp16/bf16); on CPU tensors it is
the exact reference (flash_attn_t.reference), which is how the ring logic is tested anywhere
(gloo backend).
"""
import math

import torch
import torch.distributed as dist

from . import ops
from .interface import _pad_head_dim, check_qkv, check_softmax_scale
from .reference import attention_backward_reference, attention_reference

LAYOUTS = ("zigzag", "contiguous")


# ---------------------------------------------------------------------------------------------
# the ring


def _process_group(group):
    """A ProcessGroup, None (the default group) or a one-dimensional DeviceMesh."""
    if group is not None and hasattr(group, "get_group"):  # DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group: a DeviceMesh must be one-dimensional here, got {group.ndim} dimensions "
                             "(pass mesh[dim_name] for the context-parallel dimension)")
        return group.get_group()
    return group


class _Ring:
    """This rank's place in the ring of a process group and the transfer to its neighbours."""

    def __init__(self, group, device):
        self.group, self.device = group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def _global(self, rank):
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def shift(self, tensors):
        """Starts sending `tensors` to the next rank and receiving the previous rank's; returns a
        function that waits and gives the received tensors (alone in its ring: the same ones)."""
        if self.world == 1:
            return lambda: list(tensors)
        return self.exchange(tensors, self.next, [(t.shape, t.dtype) for t in tensors], self.prev)

    def exchange(self, tensors, to, expected, source):
        """Starts sending `tensors` to rank `to` and receiving tensors of the (shape, dtype)s in
        `expected` from rank `source` (ranks within the group; either list may be empty); returns a
        function that waits and gives the received tensors."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in expected]
        ops = ([dist.P2POp(dist.isend, t, self._global(to), self.group) for t in tensors]
               + [dist.P2POp(dist.irecv, t, self._global(source), self.group) for t in received])
        requests = dist.batch_isend_irecv(ops) if ops else []

        def wait():
            for request in requests:
                request.wait()
            del tensors[:]  # sent: the buffers may go
            return received

        return wait


def _blocks(rank, src, seqlen, causal, layout):
    """The (query rows, key rows, causal) pieces of this rank's queries against the K/V shard of
    rank `src` that see any key; rows as slices of the local shards."""
    every = slice(None)
    if not causal or src == rank:  # on its own shard the local order is the global order
        return [(every, every, causal)]
    if layout == "contiguous":
        return [(every, every, False)] if src < rank else []
    # zigzag: src's first chunk lies before both of ours; its second lies after our first and
    # before our second.
    half = seqlen // 2
    return [(every, slice(0, half), False)] if src < rank else [(slice(half, None), every, False)]


# ---------------------------------------------------------------------------------------------
# the local attention: the kernels on CUDA, the exact reference on the CPU


def _accumulation_dtype(t):
    """Partial results are merged and summed in fp32 (fp64 for fp64 input)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _local_forward(q, k, v, softmax_scale, causal):
    """(out in the accumulation dtype, lse) of q against one block of keys."""
    if q.is_cuda:
        out, lse = torch.ops.flash_attn_t.fwd(*_pad_head_dim(q, k, v), softmax_scale, causal)
        return out[..., :q.shape[-1]].float(), lse
    return attention_reference(q, k, v, softmax_scale, causal, compute_dtype=_accumulation_dtype(q))


def _local_backward(dout, q, k, v, out, lse, softmax_scale, causal, deterministic):
    """This block's share of dq, dk, dv, from the final out and lse."""
    if q.is_cuda:
        padded = [t.contiguous() for t in _pad_head_dim(dout, q, k, v, out)]
        grads = torch.ops.flash_attn_t.bwd(*padded, lse.contiguous(), softmax_scale, causal, deterministic)[:3]
        return [g[..., :q.shape[-1]] for g in grads]
    return attention_backward_reference(dout, q, k, v, out, lse, softmax_scale, causal,
                                        compute_dtype=_accumulation_dtype(q))


def _merge(out, lse, rows, block_out, block_lse):
    """out[:, rows], lse[..., rows] <- the exact softmax merge with a block's partial (in place;
    block_lse is -inf on rows that saw no key of the block)."""
    old = lse[..., rows]
    new = torch.logaddexp(old, block_lse)
    safe = torch.where(new == -math.inf, 0.0, new)
    weight_old, weight_block = (torch.exp(x - safe).transpose(1, 2)[..., None] for x in (old, block_lse))
    out[:, rows].mul_(weight_old).add_(block_out * weight_block)
    lse[..., rows] = new


# ---------------------------------------------------------------------------------------------
# autograd


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, softmax_scale, causal, layout, deterministic):
        accum = _accumulation_dtype(q)
        seqlen = q.shape[1]
        kv, out, lse = [k, v], None, None
        for step in range(ring.world):
            incoming = ring.shift(kv) if step + 1 < ring.world else None  # in flight during the compute
            for q_rows, kv_rows, causal_block in _blocks(ring.rank, (ring.rank - step) % ring.world, seqlen,
                                                         causal, layout):
                block_out, block_lse = _local_forward(q[:, q_rows], kv[0][:, kv_rows], kv[1][:, kv_rows],
                                                      softmax_scale, causal_block)
                block_lse = torch.where(block_lse == math.inf, -math.inf, block_lse.to(accum))  # +inf: no key
                if out is None:  # step 0: the rank's own block, every row
                    out, lse = block_out.to(accum), block_lse
                else:
                    _merge(out, lse, q_rows, block_out, block_lse)
            if incoming is not None:
                kv = incoming()
        lse = torch.where(lse == -math.inf, math.inf, lse)  # rows that saw no key: the kernels' convention
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.softmax_scale, ctx.causal, ctx.layout, ctx.deterministic = (
            ring, softmax_scale, causal, layout, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, seqlen = ctx.ring, q.shape[1]
        accum = _accumulation_dtype(q)

        def pieces(rank, src):  # (q rows, kv rows, causal) of rank's queries against src's K/V
            return _blocks(rank, src, seqlen, ctx.causal, ctx.layout)

        def gradients(kv, piece):
            q_rows, kv_rows, causal_block = piece
            return _local_backward(dout[:, q_rows], q[:, q_rows], kv[0][:, kv_rows], kv[1][:, kv_rows],
                                   out[:, q_rows], lse[..., q_rows], ctx.softmax_scale, causal_block,
                                   ctx.deterministic)

        incoming_kv = ring.shift([k, v]) if ring.world > 1 else None
        dq, dk, dv = gradients([k, v], pieces(ring.rank, ring.rank)[0])  # step 0: the own block, every row
        if ring.world == 1:
            return dq, dk, dv, None, None, None, None, None
        dq, dkv = dq.to(accum), [dk.to(accum), dv.to(accum)]
        returning = None
        for step in range(1, ring.world):
            kv = incoming_kv()
            incoming_kv = ring.shift(kv) if step + 1 < ring.world else None
            src, partials = (ring.rank - step) % ring.world, []
            for piece in pieces(ring.rank, src):
                dq_part, dk_part, dv_part = gradients(kv, piece)
                dq[:, piece[0]] += dq_part
                partials += [dk_part, dv_part]
            if returning is not None:
                _add_partials(dkv, *returning)
            # The dK/dV partials go home to their block's rank while the next block is computed (in
            # the kernels' dtype, summed there in fp32); ours come back from the rank `step` ahead.
            source = (ring.rank + step) % ring.world
            rows = [kv_rows for _, kv_rows, _ in pieces(source, ring.rank)]
            expected = [(t[:, r].shape, _partials_dtype(q)) for r in rows for t in (k, v)]
            returning = ring.exchange(partials, src, expected, source), rows
        _add_partials(dkv, *returning)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def _partials_dtype(q):
    """The dtype of _local_backward's gradients."""
    return q.dtype if q.is_cuda else _accumulation_dtype(q)


def _add_partials(dkv, wait, rows):
    """dK/dV of this rank's block += the partials received for the key rows `rows`."""
    received = wait()
    for i, kv_rows in enumerate(rows):
        dkv[0][:, kv_rows] += received[2 * i]
        dkv[1][:, kv_rows] += received[2 * i + 1]


# ---------------------------------------------------------------------------------------------
# public API


def _check_layout(layout, seqlen, world, name):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * world if layout == "zigzag" else world
    if seqlen % parts != 0:
        raise ValueError(f"{name}: a sequence of {seqlen} tokens does not split into the {parts} equal chunks the "
                         f"{layout} layout over {world} ranks needs (pad it to a multiple of {parts})")


def ring_flash_attn_func(q, k, v, group=None, causal=False, softmax_scale=None, layout="zigzag",
                         deterministic=False, return_attn_probs=False):
    """Exact attention over a sequence sharded across the ranks of `group` (a ProcessGroup, None
    for the default one, or a one-dimensional DeviceMesh).

    q: (batch, seqlen_local, nheads, headdim); k, v: (batch, seqlen_local, nheads_k, headdim):
    this rank's shard in `layout` ("zigzag" or "contiguous", see shard_sequence), the same length
    on every rank, nheads a multiple of nheads_k (GQA: k and v are never expanded). causal masks
    by global position. CUDA tensors run the kernels (fp16/bf16, one GPU per rank, NCCL); CPU
    tensors the exact reference (any float dtype, gloo). Differentiable; the backward sends K/V and
    the dK/dV accumulators around the ring. Returns this rank's out (q's shape); with
    return_attn_probs=True, (out, lse, None) with lse (batch, nheads, seqlen_local) in fp32 (fp64
    for fp64 input).
    """
    group = _process_group(group)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_flash_attn_func needs torch.distributed initialised (init_process_group)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, seqlen_local, nheads, headdim)")
    if k.shape[1] != q.shape[1] or v.shape != k.shape:
        raise ValueError(f"k and v must have q's local sequence length and each other's shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    ring = _Ring(group, q.device)
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(f"q: the zigzag layout holds two equal chunks per rank, so seqlen_local must be even, "
                         f"got {q.shape[1]}")
    _check_layout(layout, q.shape[1] * ring.world, ring.world, "q")
    if q.is_cuda:
        check_qkv(q, k, v, varlen=False)
        ops.require_extension()
    elif q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"nheads ({q.shape[-2]}) must be a multiple of nheads_k ({k.shape[-2]}) (GQA/MQA)")
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])
    out, lse = _RingAttention.apply(q, k, v, ring, softmax_scale, bool(causal), layout, bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


def _chunk_order(world, layout):
    """The global chunk index of each chunk, in the order the ranks hold them."""
    if layout == "contiguous":
        return list(range(world))
    return [c for r in range(world) for c in (r, 2 * world - 1 - r)]


def shard_sequence(x, group=None, layout="zigzag", dim=1):
    """This rank's shard of a full sequence (the same tensor on every rank) along `dim`."""
    group = _process_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_layout(layout, x.shape[dim], world, "x")
    chunks = x.chunk(len(_chunk_order(world, layout)), dim=dim)
    per_rank = len(chunks) // world
    mine = _chunk_order(world, layout)[rank * per_rank:(rank + 1) * per_rank]
    return torch.cat([chunks[c] for c in mine], dim=dim)


def unshard_sequence(x, group=None, layout="zigzag", dim=1):
    """The full sequence from every rank's shard (an all-gather; not differentiable)."""
    group = _process_group(group)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    order = _chunk_order(world, layout)
    chunks = [c for shard in gathered for c in shard.chunk(len(order) // world, dim=dim)]
    in_place = [None] * len(order)
    for position, chunk in zip(order, chunks):
        in_place[position] = chunk
    return torch.cat(in_place, dim=dim)
