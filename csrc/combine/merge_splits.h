// Split-KV's merge (flash_attn_t/decode.py): each (sequence, split) attended to its part of the
// keys with the query heads of a kv head packed into rows; this adds the splits' outputs weighted
// by exp(lse_split - lse_total) and writes every row back to its own (query, head) place, in one
// kernel -- the decode step's second and last launch.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

#include "../common/ptx.h"
#include "../launch.h"
#include "../params.h"

namespace fat {

template <typename Element, int HeadDim>
__global__ void __launch_bounds__(128) merge_splits_kernel(const MergeParams p) {
  constexpr int kPerLane = HeadDim / 32;  // output columns of a lane: 4 (hd128) or 2 (hd64)
  using Ops = ElementOps<Element>;
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;  // one warp per (b, row, kv head)
  if (item >= static_cast<int64_t>(p.batch) * p.rows * p.heads_k) return;
  const int hk = static_cast<int>(item % p.heads_k), row = static_cast<int>(item / p.heads_k % p.rows);
  const int b = static_cast<int>(item / (static_cast<int64_t>(p.heads_k) * p.rows));
  // lse of split s: lse_partial[(b * splits + s, hk, row)]; +inf (no key) counts as -inf here.
  auto split_lse = [&](int s) {
    const float l = p.lse_partial[((static_cast<int64_t>(b) * p.splits + s) * p.heads_k + hk) * p.rows + row];
    return l == INFINITY ? -INFINITY : l;
  };
  float m = -INFINITY;
  for (int s = lane; s < p.splits; s += 32) m = fmaxf(m, split_lse(s));
#pragma unroll
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.f;
  if (m != -INFINITY)
    for (int s = lane; s < p.splits; s += 32) sum += __expf(split_lse(s) - m);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float total = m == -INFINITY ? -INFINITY : m + __logf(sum);

  // A lane's columns of one split's output, read in one load.
  struct alignas(sizeof(Element) * kPerLane) Chunk {
    Element v[kPerLane];
  };
  float acc[kPerLane] = {};
  if (total != -INFINITY) {
    // Unrolled and without a branch on the weight, so the loads of eight splits are in flight at
    // once (one split at a time, each behind the last, took ~0.4 us a split). A split without
    // keys weighs 0 and is not added, whatever its output holds.
#pragma unroll 8
    for (int s = 0; s < p.splits; ++s) {
      const float w = __expf(split_lse(s) - total);
      const Chunk chunk = *reinterpret_cast<const Chunk*>(
          static_cast<const Element*>(p.out_partial) +
          (((static_cast<int64_t>(b) * p.splits + s) * p.rows + row) * p.heads_k + hk) * HeadDim + lane * kPerLane);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = w > 0.f ? fmaf(w, Ops::to_float(chunk.v[i]), acc[i]) : acc[i];
    }
  }
  // Packed row = query * group + g belongs to head hk * group + g of that query.
  const int query = row / p.group, head = hk * p.group + row % p.group, heads = p.heads_k * p.group;
  Element* dst = static_cast<Element*>(p.out) +
                 ((static_cast<int64_t>(b) * p.seqlen_q + query) * heads + head) * HeadDim + lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; i += 2) *reinterpret_cast<uint32_t*>(dst + i) = Ops::pack(acc[i], acc[i + 1]);
  if (lane == 0)
    p.lse[(static_cast<int64_t>(b) * heads + head) * p.seqlen_q + query] = total == -INFINITY ? INFINITY : total;
}

template <typename Element, int HeadDim>
cudaError_t run_merge_splits(const MergeParams& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.batch) * p.rows * p.heads_k;
  if (warps == 0) return cudaSuccess;
  merge_splits_kernel<Element, HeadDim><<<static_cast<unsigned>((warps + 3) / 4), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fat
