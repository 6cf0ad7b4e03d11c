// sm90 backward: TMA + wgmma, warp-specialized. A CTA owns one block of 128 keys (see BwdTraits)
// and walks the query blocks that see them, for every q head of its kv head's group (GQA
// gradients are summed in registers, never expanded). Per query block, recomputing P from lse:
//   S^T = K Q^T, dP^T = V dO^T, P^T = exp2(S^T scale_log2 - lse log2 e), dS^T = P^T (dP^T - D),
//   dV += P^T dO, dK += dS^T Q (A operands from registers), dQ = dS K (dS^T from shared memory),
// with the fp32 dQ block added into dq_accum by the bulk copy engine off the MMA warps. dQ of a
// step needs both warpgroups' halves of dS^T: the warpgroups meet at a named barrier every step,
// or (kDqOneStepLate) dQ is issued a step late and they never wait for each other inside a step.
//   producer warpgroup: warp 0 loads K, V once per key block and Q, dO per query block with TMA;
//                       warp 1 stages each query block's lse (in log2 units) and D rows; warp 2
//                       drains the staged dQ blocks into dq_accum (cp.reduce.async.bulk);
//   consumer warpgroups: 64 keys each.
#pragma once
#include <cuda.h>

#include <cmath>

#include "../common/mask.h"
#include "../common/ptx.h"
#include "../common/seq_info.h"
#include "../common/sm90_ptx.h"
#include "../params.h"
#include "operands.h"
#include "pipeline.h"
#include "traits.h"

// Benchmark-only (setup.py, FLASH_ATTN_T_BWD_TIMING_SKIP_ELEMENTWISE=1): a build WITHOUT the
// per-element work between the GEMMs (P = exp2(...), masks, dS = P (dP - D)), to time how long
// that work keeps the tensor cores waiting (the FA-T vector interval). Its gradients are wrong.
#ifndef FAT_BWD_TIMING_SKIP_ELEMENTWISE
#define FAT_BWD_TIMING_SKIP_ELEMENTWISE 0
#endif
// Benchmark-only, likewise (FLASH_ATTN_T_BWD_TIMING_SKIP_DQ_REDUCE=1): the drain warp skips the
// bulk reductions into dq_accum (dQ stays zero), to time what the L2 reduction traffic costs.
#ifndef FAT_BWD_TIMING_SKIP_DQ_REDUCE
#define FAT_BWD_TIMING_SKIP_DQ_REDUCE 0
#endif

namespace fat::sm90 {

// The shared-memory carve-up of BwdTraits, from a base aligned up to 1024 bytes.
template <typename Traits>
struct BwdSmem {
  using Element = typename Traits::Element;
  char* base;
  __device__ __forceinline__ explicit BwdSmem(char* raw) : base(raw + ((1024 - (smem_addr(raw) & 1023)) & 1023)) {}
  template <typename T = Element>
  __device__ __forceinline__ T* at(uint32_t offset) const {
    return reinterpret_cast<T*>(base + offset);
  }
  __device__ __forceinline__ Element* k() const { return at(Traits::kKOffset); }
  __device__ __forceinline__ Element* v() const { return at(Traits::kVOffset); }
  __device__ __forceinline__ Element* q(int stage) const { return at(Traits::kQOffset + stage * Traits::kQBytes); }
  __device__ __forceinline__ Element* dout(int stage) const {
    return at(Traits::kDoOffset + stage * Traits::kQBytes);
  }
  __device__ __forceinline__ Element* ds(int buffer) const { return at(Traits::kDsOffset + buffer * Traits::kDsBytes); }
  __device__ __forceinline__ float* dq() const { return at<float>(Traits::kDqOffset); }
  // Per stage: the query block's lse * log2(e) (+inf past the sequence end) and D (0 there).
  __device__ __forceinline__ float* lse_log2(int stage) const {
    return at<float>(Traits::kLseOffset + 2 * stage * Traits::kRowStatBytes);
  }
  __device__ __forceinline__ float* dsum(int stage) const { return lse_log2(stage) + Traits::kBlockM; }
  __device__ __forceinline__ uint64_t* barriers() const { return at<uint64_t>(Traits::kBarrierOffset); }
  __device__ __forceinline__ uint64_t* kv_full() const { return barriers(); }
  __device__ __forceinline__ uint64_t* kv_empty() const { return barriers() + 1; }
  __device__ __forceinline__ uint64_t* q_full(int stage) const { return barriers() + 2 + stage; }
  __device__ __forceinline__ uint64_t* q_empty(int stage) const { return barriers() + 2 + Traits::kStages + stage; }
  __device__ __forceinline__ uint64_t* dq_full() const { return barriers() + 2 + 2 * Traits::kStages; }
  __device__ __forceinline__ uint64_t* dq_empty() const { return dq_full() + 1; }
  // dS^T buffer b: both warpgroups' halves stored (full); both warpgroups' dQ reads done (free).
  __device__ __forceinline__ uint64_t* ds_full(int buffer) const { return dq_empty() + 1 + buffer; }
  __device__ __forceinline__ uint64_t* ds_free(int buffer) const { return dq_empty() + 3 + buffer; }
};

// One key block of one (kv head, batch) and the (q head, query block) steps that visit it.
template <typename Traits, typename Mask>
struct BwdKeyBlock {
  SeqInfo seq;
  Mask mask;
  int head_k, first_key, m_begin, m_count, steps, dq_split;
  __device__ __forceinline__ BwdKeyBlock(const BwdParams& p, int n, int hk, int b, int split)
      : seq(p, b), mask(seq, p), head_k(hk), dq_split(split) {
    first_key = n * Traits::kBlockN;
    m_begin = mask.m_begin(first_key, Traits::kBlockM);
    const int m_blocks = ceil_div(seq.len_q, Traits::kBlockM);
    const int m_end = mask.m_end(first_key + Traits::kBlockN - 1, Traits::kBlockM, m_blocks);
    m_count = max(0, m_end - m_begin);
    steps = exists() ? p.heads / p.heads_k * m_count : 0;
  }
  // Past this sequence's keys (varlen, or a deterministic CTA's loop): nothing to do or write.
  __device__ __forceinline__ bool exists() const { return first_key < seq.len_k; }
  __device__ __forceinline__ int valid_keys() const { return min(Traits::kBlockN, seq.len_k - first_key); }
  // Step s: q head (heads of the group outermost) and first query row.
  __device__ __forceinline__ int head(int s, int group) const { return head_k * group + s / m_count; }
  __device__ __forceinline__ int first_row(int s) const { return (m_begin + s % m_count) * Traits::kBlockM; }
  __device__ __forceinline__ int batch_coord() const { return seq.varlen ? 0 : seq.batch; }
};

// Which key blocks a CTA owns. Default: one; key blocks fastest in the launch order, so the CTAs
// running together are neighbouring key blocks of few heads and share those heads' Q, dO and
// dq_accum rows in L2; under causal a head's blocks still come heaviest first (block 0 is seen
// by every query). (All heads' block 0 first instead measured up to 16% slower at hd128 causal
// 2k: benchmarks/NOTES.md, sm90 backward step 2.)
// Deterministic: CTA (split, kv head, batch) owns blocks split, split + splits, ... and its own
// dq_accum split, and walks them in order, so every fp32 slot of dq_accum is added to in a fixed
// order.
template <typename Traits, typename Mask, typename F>
__device__ __forceinline__ void for_each_key_block(const BwdParams& p, F&& f) {
  const int n_blocks = ceil_div(p.seqlen_k, Traits::kBlockN);
  if (p.deterministic) {
    const int split = blockIdx.x % p.num_splits, bh = blockIdx.x / p.num_splits;
    for (int n = split; n < n_blocks; n += p.num_splits)
      f(BwdKeyBlock<Traits, Mask>(p, n, bh % p.heads_k, bh / p.heads_k, split));
  } else {
    int n = blockIdx.x % n_blocks, bh = blockIdx.x / n_blocks;
    // Under causal and windows a group's blocks get lighter with n, so in group-major order the
    // last CTAs to start include the last group's heaviest, which run on while the other SMs
    // idle. The last kTailGroups groups go block-major instead (every one's block 0, then every
    // one's block 1, ...): the launch ends on light blocks (4 measured best of 0 / 4 / 8).
    constexpr int kTailGroups = 4;
    const int groups = p.heads_k * p.batch, tail = min(kTailGroups, groups);
    if ((Mask::kCausal || Mask::kLocal) && bh >= groups - tail) {
      const int r = blockIdx.x - (groups - tail) * n_blocks;
      n = r / tail;
      bh = groups - tail + r % tail;
    }
    f(BwdKeyBlock<Traits, Mask>(p, n, bh % p.heads_k, bh / p.heads_k, 0));
  }
}

// The mbarriers of the K/V slot and of the Q/dO ring, which every sm90 backward kernel has
// (thread 0, before its fence).
template <typename Traits>
__device__ __forceinline__ void init_ring_barriers(const BwdSmem<Traits>& sm) {
  constexpr int kConsumerThreads = 128 * Traits::kConsumerWarpgroups;
  mbar_init(sm.kv_full(), 1);
  mbar_init(sm.kv_empty(), kConsumerThreads / 32);  // one arrival per consumer warp
  for (int s = 0; s < Traits::kStages; ++s) {
    mbar_init(sm.q_full(s), 1 + 32);  // the TMA thread (with its bytes) and the lse/D warp
    mbar_init(sm.q_empty(s), kConsumerThreads);
  }
}

// A consumer thread's dK (times softmax_scale) and dV (times dv_scale) of a key block, in the
// m16n8 accumulator layout: rows key0 and key0 + 8 of the block (keys past its end skipped),
// columns col0 + 8 t, col0 + 8 t + 1 of tile t.
template <typename Traits, typename Mask, int Tiles>
__device__ __forceinline__ void store_kv_grads(const BwdParams& p, const BwdKeyBlock<Traits, Mask>& blk, int key0,
                                               int col0, const float (&dk)[Tiles][4], const float (&dv)[Tiles][4],
                                               float dv_scale) {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  Element* dk_out = static_cast<Element*>(p.dk) + blk.seq.k_offset(p.dk_batch_stride, p.dk_row_stride) +
                    blk.head_k * p.dk_head_stride + blk.first_key * p.dk_row_stride;
  Element* dv_out = static_cast<Element*>(p.dv) + blk.seq.k_offset(p.dv_batch_stride, p.dv_row_stride) +
                    blk.head_k * p.dv_head_stride + blk.first_key * p.dv_row_stride;
  const int valid = blk.valid_keys();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= valid) continue;
#pragma unroll
    for (int t = 0; t < Tiles; ++t) {
      const int col = col0 + 8 * t;
      *reinterpret_cast<uint32_t*>(dk_out + key * p.dk_row_stride + col) =
          Ops::pack(dk[t][2 * r] * p.softmax_scale, dk[t][2 * r + 1] * p.softmax_scale);
      *reinterpret_cast<uint32_t*>(dv_out + key * p.dv_row_stride + col) =
          Ops::pack(dv[t][2 * r] * dv_scale, dv[t][2 * r + 1] * dv_scale);
    }
  }
}

// ---- producer warp 0, one thread: K and V once per key block, Q and dO per step.
template <typename Traits, typename Mask>
__device__ __forceinline__ void load_tiles(const BwdParams& p, const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                           const CUtensorMap* tma_v, const CUtensorMap* tma_do,
                                           const BwdSmem<Traits>& sm) {
  constexpr int kSlabElems = 64, kSlabs = Traits::kHeadDim / 64;
  RingPosition<1> kv;
  RingPosition<Traits::kStages> q;
  const int group = p.heads / p.heads_k;
  for_each_key_block<Traits, Mask>(p, [&](const BwdKeyBlock<Traits, Mask>& blk) {
    if (blk.steps == 0) return;
    const int b = blk.batch_coord(), key_row = static_cast<int>(blk.seq.first_k) + blk.first_key;
    kv.wait_empty(sm.kv_empty());
    mbar_arrive_expect_tx(sm.kv_full(), 2 * Traits::kKVBytes);
#pragma unroll
    for (int slab = 0; slab < kSlabs; ++slab) {
      tma_load_4d(sm.k() + slab * Traits::kBlockN * kSlabElems, tma_k, sm.kv_full(), slab * kSlabElems, key_row,
                  blk.head_k, b);
      tma_load_4d(sm.v() + slab * Traits::kBlockN * kSlabElems, tma_v, sm.kv_full(), slab * kSlabElems, key_row,
                  blk.head_k, b);
    }
    kv = kv.plus(1);
    for (int s = 0; s < blk.steps; ++s, q = q.plus(1)) {
      const int stage = q.stage(), head = blk.head(s, group);
      const int row = static_cast<int>(blk.seq.first_q) + blk.first_row(s);
      q.wait_empty(sm.q_empty(stage));
      mbar_arrive_expect_tx(sm.q_full(stage), 2 * Traits::kQBytes);
#pragma unroll
      for (int slab = 0; slab < kSlabs; ++slab) {
        tma_load_4d(sm.q(stage) + slab * Traits::kBlockM * kSlabElems, tma_q, sm.q_full(stage), slab * kSlabElems,
                    row, head, b);
        tma_load_4d(sm.dout(stage) + slab * Traits::kBlockM * kSlabElems, tma_do, sm.q_full(stage),
                    slab * kSlabElems, row, head, b);
      }
    }
  });
}

// ---- producer warp 1: each step's lse (times log2 e) and D rows, into the same ring slot as its
// Q and dO. Rows past the sequence end get lse = +inf and D = 0, so their P and dS are exactly 0
// whatever TMA brought for them (zeros, or the next sequence's rows when varlen).
template <typename Traits, typename Mask>
__device__ __forceinline__ void load_row_stats(const BwdParams& p, const BwdSmem<Traits>& sm) {
  constexpr float kLog2e = 1.4426950408889634f;
  RingPosition<Traits::kStages> q;
  const int lane = threadIdx.x % 32, group = p.heads / p.heads_k;
  for_each_key_block<Traits, Mask>(p, [&](const BwdKeyBlock<Traits, Mask>& blk) {
    for (int s = 0; s < blk.steps; ++s, q = q.plus(1)) {
      const int stage = q.stage(), first_row = blk.first_row(s);
      const int64_t offset = blk.seq.lse_offset(p, blk.head(s, group)) + first_row;
      q.wait_empty(sm.q_empty(stage));
#pragma unroll
      for (int r = lane; r < Traits::kBlockM; r += 32) {
        const bool valid = first_row + r < blk.seq.len_q;
        sm.lse_log2(stage)[r] = valid ? p.lse[offset + r] * kLog2e : INFINITY;
        sm.dsum(stage)[r] = valid ? p.dsum[offset + r] : 0.f;
      }
      mbar_arrive(sm.q_full(stage));  // each lane: releases its stores
    }
  });
}

// ---- producer warp 2, one thread: adds each staged fp32 dQ block into dq_accum.
template <typename Traits, typename Mask>
__device__ __forceinline__ void drain_dq(const BwdParams& p, const BwdSmem<Traits>& sm) {
  RingPosition<1> dq;
  const int group = p.heads / p.heads_k;
  for_each_key_block<Traits, Mask>(p, [&](const BwdKeyBlock<Traits, Mask>& blk) {
    for (int s = 0; s < blk.steps; ++s, dq = dq.plus(1)) {
      const int first_row = blk.first_row(s);
      float* dst = p.dq_accum + blk.dq_split * p.dq_accum_split_stride +
                   blk.seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride) +
                   blk.head(s, group) * p.dq_accum_head_stride + first_row * p.dq_accum_row_stride;
      const int rows = min(Traits::kBlockM, blk.seq.len_q - first_row);
      dq.wait_full(sm.dq_full());
      // The block's rows are contiguous in dq_accum (heads-major), so one bulk reduction adds them.
      if (!FAT_BWD_TIMING_SKIP_DQ_REDUCE)
        bulk_reduce_add_f32(dst, smem_addr(sm.dq()), rows * Traits::kHeadDim * 4);
      bulk_commit();
      bulk_wait_read();  // the consumers may restage the block
      mbar_arrive(sm.dq_empty());
    }
    // Every add of this key block done before the next block's (deterministic mode adds to the
    // same rows again) and before the CTA exits.
    bulk_wait_all();
  });
}

// ---- consumer: one warpgroup, 64 keys of the block.
template <typename Traits, typename Mask>
struct BwdConsumer {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  static constexpr int kSTiles = kBlockM / 8;    // 8-column tiles of S^T, dP^T (query columns)
  static constexpr int kKvTiles = kHeadDim / 8;  // of dK, dV
  static constexpr int kSlices = kBlockM / 16;   // k16 slices of P^T, dS^T as A operands
  static constexpr int kKeepWords = (4 * kSTiles + 31) / 32;  // dropout: 4 keep bits per tile
  static_assert(!(Mask::kDropout && (Mask::kSoftcap || Mask::kAlibi)), "dropout with softcap or ALiBi: sm80 only");

  const BwdSmem<Traits>& sm;
  const int wg, lane, warp_row;  // warp_row: this warp's first key row within the warpgroup's 64

  __device__ __forceinline__ BwdConsumer(const BwdSmem<Traits>& sm_, int warpgroup)
      : sm(sm_), wg(warpgroup), lane(threadIdx.x % 32), warp_row(threadIdx.x / 32 % 4 * 16) {}

  // Row (key, 0-127) and column (query or head dim) of accumulator element [t][j] of this thread.
  __device__ __forceinline__ int key_of(int j) const { return 64 * wg + warp_row + lane / 4 + 8 * (j / 2); }
  __device__ __forceinline__ int col_of(int t, int j) const { return 8 * t + 2 * (lane % 4) + j % 2; }

  template <int Tiles>
  __device__ __forceinline__ static void zero(float (&d)[Tiles][4]) {
#pragma unroll
    for (int t = 0; t < Tiles; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) d[t][j] = 0.f;
  }

  // S^T = K Q^T and dP^T = V dO^T, issued as two groups (S first).
  __device__ __forceinline__ void issue_s_dp(float (&s)[kSTiles][4], float (&dp)[kSTiles][4], int stage) const {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      wgmma_ss<Element, kBlockM>(s, kmajor_desc(sm.k(), kBlockN, 64 * wg, kk), kmajor_desc(sm.q(stage), kBlockM, 0, kk),
                                 kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      wgmma_ss<Element, kBlockM>(dp, kmajor_desc(sm.v(), kBlockN, 64 * wg, kk),
                                 kmajor_desc(sm.dout(stage), kBlockM, 0, kk), kk > 0);
    wgmma_commit();
  }

  // acc (+)= A B with A from registers (P^T or dS^T) and B a query-rows tile (dO or Q).
  __device__ __forceinline__ static void issue_kv_grad(float (&acc)[kKvTiles][4], const uint32_t (&a)[kSlices][4],
                                                       const Element* b_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kSlices; ++kk)
      wgmma_rs<Element, kHeadDim>(acc, a[kk], mn_major_desc(b_tile, kBlockM, kk), 1);
    wgmma_commit();
  }

  // This warpgroup's 64 x 64 piece of dQ = dS K: dS^T (keys x queries, `ds_tile`) as a transposed
  // A, K as a transposed B, over all 128 keys.
  __device__ __forceinline__ void issue_dq(float (&dq)[8][4], const Element* ds_tile) const {
    constexpr uint32_t kSlab = kBlockN * kSlabRowBytes;
    const Element* a_tile = ds_tile + (Traits::kDqSplitRows ? wg * kSlab / sizeof(Element) : 0);
    const Element* b_tile = sm.k() + (Traits::kDqSplitRows ? 0 : wg * kSlab / sizeof(Element));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      wgmma_ss<Element, 64, true, true>(dq, mn_major_desc(a_tile, kBlockN, kk), mn_major_desc(b_tile, kBlockN, kk),
                                        kk > 0);
    wgmma_commit();
  }

  // S^T -> P^T = exp2(S^T scale_log2 - lse log2 e), 0 where masked: keys past the end, and keys
  // right of the (bottom-right aligned) causal diagonal. Only blocks that reach past the end or
  // cross the diagonal test elements: two loops, not one with a per-element test, which ptxas
  // turned into predicated compares on every element of every block (hd64 causal ran at half
  // the speed of the same build without element-wise work).
  // alibi_coef: the step's head's ALiBi factor (Variant::alibi_coef; unused without ALiBi).
  __device__ __forceinline__ void scores_to_p(float (&s)[kSTiles][4], const BwdKeyBlock<Traits, Mask>& blk,
                                              int first_row, int stage, float scale_log2, float alibi_coef) const {
    if (blk.mask.block_needs_mask(first_row, kBlockM, blk.first_key + 64 * wg, 64))
      exponentiate<true>(s, blk, first_row, stage, scale_log2, alibi_coef);
    else
      exponentiate<false>(s, blk, first_row, stage, scale_log2, alibi_coef);
  }
  template <bool MaskElements>
  __device__ __forceinline__ void exponentiate(float (&s)[kSTiles][4], const BwdKeyBlock<Traits, Mask>& blk,
                                               int first_row, int stage, float scale_log2, float alibi_coef) const {
    const float* lse = sm.lse_log2(stage);
    // ALiBi: the query position (row + shift) and key of element (t, j) are these lane bases plus
    // 8 t + j % 2 and 8 (j / 2) (col_of, key_of)
    const float alibi_position = static_cast<float>(first_row + blk.mask.shift + col_of(0, 0));
    const float alibi_key = static_cast<float>(blk.first_key + key_of(0));
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
      const float2 l = *reinterpret_cast<const float2*>(lse + col_of(t, 0));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (Mask::kAlibi)
          s[t][j] = blk.mask.alibi_bias(s[t][j], alibi_coef, alibi_position + static_cast<float>(8 * t + j % 2),
                                        alibi_key + static_cast<float>(8 * (j / 2)));
        float p = fast_exp2(fmaf(s[t][j], scale_log2, -(j % 2 ? l.y : l.x)));
        if constexpr (MaskElements) {
          if (blk.mask.masked(first_row + col_of(t, j), blk.first_key + key_of(j))) p = 0.f;
        }
        s[t][j] = p;
      }
    }
  }

  // Softcap: S^T and dP^T -> P^T = exp2(t scale_log2 - lse log2 e) with t = tanh(S^T softcap_scale),
  // and dS^T = P^T (dP^T - D) (1 - t^2), in one pass (t is needed by both; keeping it beside P^T
  // would cost a tile of registers).
  __device__ __forceinline__ void softcap_p_and_ds(float (&s)[kSTiles][4], float (&dp)[kSTiles][4],
                                                   const BwdKeyBlock<Traits, Mask>& blk, int first_row, int stage,
                                                   float scale_log2) const {
    if (blk.mask.block_needs_mask(first_row, kBlockM, blk.first_key + 64 * wg, 64))
      softcap_p_and_ds<true>(s, dp, blk, first_row, stage, scale_log2);
    else
      softcap_p_and_ds<false>(s, dp, blk, first_row, stage, scale_log2);
  }
  template <bool MaskElements>
  __device__ __forceinline__ void softcap_p_and_ds(float (&s)[kSTiles][4], float (&dp)[kSTiles][4],
                                                   const BwdKeyBlock<Traits, Mask>& blk, int first_row, int stage,
                                                   float scale_log2) const {
    const float* lse = sm.lse_log2(stage);
    const float* dsum = sm.dsum(stage);
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
      const float2 l = *reinterpret_cast<const float2*>(lse + col_of(t, 0));
      const float2 d = *reinterpret_cast<const float2*>(dsum + col_of(t, 0));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float score = blk.mask.score(s[t][j]);
        float p = fast_exp2(fmaf(score, scale_log2, -(j % 2 ? l.y : l.x)));
        if constexpr (MaskElements) {
          if (blk.mask.masked(first_row + col_of(t, j), blk.first_key + key_of(j))) p = 0.f;
        }
        s[t][j] = p;
        dp[t][j] = p * (dp[t][j] - (j % 2 ? d.y : d.x)) * blk.mask.score_grad(score);
      }
    }
  }

  // dP^T -> dS^T = P^T (dP^T - D); with dropout P^T (Z dP^T / p_keep - D), D from the dropped
  // output.
  __device__ __forceinline__ void dp_to_ds(float (&dp)[kSTiles][4], const float (&p)[kSTiles][4], int stage,
                                           const uint32_t (&keep)[kKeepWords], float dropout_scale) const {
    const float* dsum = sm.dsum(stage);
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
      const float2 d = *reinterpret_cast<const float2*>(dsum + col_of(t, 0));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float g = dp[t][j];
        if constexpr (Mask::kDropout) g = (keep[t / 8] >> (4 * (t % 8) + j) & 1u) ? g * dropout_scale : 0.f;
        dp[t][j] = p[t][j] * (g - (j % 2 ? d.y : d.x));
      }
    }
  }

  // Dropout's keep bits of this lane's elements of S^T: element [t][j] (query col_of(t, j), key
  // key_of(j)) at bit 4 (t % 8) + j of word t / 8. A Philox call gives the 8 keep values one lane
  // of the forward's (query-row) layout holds in a 32-key group: keys 8 t' + 2 quad + e of the
  // group (common/philox.h). This lane's keys key_of(0) and key_of(2) = key_of(0) + 8 lie in one
  // group, at t' = 2 (warp % 2) + j / 2, quad = lane / 8, e = lane / 4 % 2: 2 of a call's 8 values
  // per query (the other 4 this warp needs nothing of belong to the neighbouring warp). The lane
  // and its partner lane ^ 4 (the other e, the same queries) draw one query parity each and swap.
  __device__ __forceinline__ void draw_keep(uint32_t (&keep)[kKeepWords], const BwdKeyBlock<Traits, Mask>& blk,
                                            int bh, int first_row) const {
    const int e = lane / 4 % 2, quad = lane / 8, bit0 = 4 * (warp_row / 16 % 2) + e;
    const int group = (blk.first_key + key_of(0)) / 32;
#pragma unroll
    for (int w = 0; w < kKeepWords; ++w) keep[w] = 0u;
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
      const uint32_t mine = blk.mask.dropout_bits(bh, first_row + col_of(t, e), group, quad);
      const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 4);
      const uint32_t even = e ? other : mine, odd = e ? mine : other;  // query parity 0 and 1
      const uint32_t bits = (even >> bit0 & 1u) | (odd >> bit0 & 1u) << 1 | (even >> (bit0 + 2) & 1u) << 2 |
                            (odd >> (bit0 + 2) & 1u) << 3;
      keep[t / 8] |= bits << (4 * (t % 8));
    }
  }

  // Zeroes the dropped elements of the packed P^T fragments (pack_a_fragments: a[kk][i] holds
  // tile 2 kk + i / 2, elements 2 (i % 2) and 2 (i % 2) + 1).
  __device__ __forceinline__ static void drop(uint32_t (&a)[kSlices][4], const uint32_t (&keep)[kKeepWords]) {
#pragma unroll
    for (int kk = 0; kk < kSlices; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tile = 2 * kk + i / 2;
        a[kk][i] &= keep_pair_mask(keep[tile / 8] >> (4 * (tile % 8) + 2 * (i % 2)));
      }
  }

  // This warpgroup's rows of dS^T into shared memory in the swizzled slab layout (4-byte stores:
  // each lane's column pair; the 8 rows of a store fall in 8 different 16-byte chunks). A lane's
  // rows are r = 8i + lane/4, so the swizzle XORs the chunk index with lane/4 in every store: the
  // address is the lane's base XOR the chunk's constant offset (the tile is 1024-byte aligned).
  __device__ __forceinline__ void store_ds(const uint32_t (&ds)[kSlices][4], int buffer) const {
    const uint32_t base =
        smem_addr(sm.ds(buffer)) + swizzled_offset(kBlockN, key_of(0), col_of(0, 0), sizeof(Element));
#pragma unroll
    for (int kk = 0; kk < kSlices; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int query = 16 * kk + 8 * (j / 2);  // the store's first column (lane 0's)
        const uint32_t slab = query / 64 * kBlockN * kSlabRowBytes, chunk = query % 64 / 8 * 16;
        st_shared_u32((base ^ chunk) + slab + 8 * (j % 2) * kSlabRowBytes, ds[kk][j]);
      }
  }

  // The dQ piece into the staged fp32 block, in dq_accum's row layout: columns swizzled by
  // dq_accum_col, col ^ 8 (row % 8) with row % 8 = lane/4 in every store of a lane, so again the
  // lane's base XOR a constant (8-column groups are 32 bytes; rows 256-byte aligned or more).
  __device__ __forceinline__ void store_dq(const float (&dq)[8][4]) const {
    constexpr uint32_t kRowBytes = kHeadDim * sizeof(float);
    const int row0 = Traits::kDqSplitRows ? 64 * wg : 0, col0 = Traits::kDqSplitRows ? 0 : 64 * wg;
    const int row = row0 + warp_row + lane / 4;
    const uint32_t base =
        smem_addr(sm.dq()) + row * kRowBytes + dq_accum_col(row, col0 + col_of(0, 0)) * sizeof(float);
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        st_shared_f32x2((base ^ (32 * t)) + 8 * r * kRowBytes, dq[t][2 * r], dq[t][2 * r + 1]);
  }

  // A retired dQ piece into the staged block, for the drain warp.
  __device__ __forceinline__ void stage_dq(float (&dq)[8][4], RingPosition<1>& dq_slot) const {
    fence_operand(dq);
    dq_slot.wait_empty(sm.dq_empty());  // the drain warp has read the last staged block
    store_dq(dq);
    fence_proxy_async();  // read next by the bulk copy engine
    mbar_arrive(sm.dq_full());
    dq_slot = dq_slot.plus(1);
  }

  // One step: S^T, dP^T; P^T, dS^T; dV; this warpgroup's half of dS^T published; dQ; dK.
  // dQ needs both halves. Either the warpgroups meet at a named barrier and issue this step's dQ,
  // or (kDqOneStepLate) each issues the previous step's dQ, whose halves are published by then
  // unless the other warpgroup is more than a step behind, and never waits inside a step. A key
  // block's first step then has no dQ to issue but issues one anyway, over the K/V tiles (stable
  // for the whole block) in place of dS^T, and discards it: every step issues the same wgmmas
  // (with the first step as a separate copy without dQ, ptxas serialized every wgmma of the hd64
  // kernel for lack of registers, C7512); run() issues the block's last dQ.
  __device__ __forceinline__ void step(const BwdParams& p, const BwdKeyBlock<Traits, Mask>& blk, int s_idx,
                                       RingPosition<Traits::kStages> q, RingPosition<2> ds,
                                       RingPosition<1>& dq_slot, float (&dk)[kKvTiles][4],
                                       float (&dv)[kKvTiles][4]) const {
    constexpr bool kLate = Traits::kDqOneStepLate;
    const int stage = q.stage(), first_row = blk.first_row(s_idx);
    const bool has_dq = !kLate || s_idx > 0;
    const RingPosition<2> dq_of = kLate ? ds.plus(-1) : ds;  // the step whose dQ this step issues
    float s[kSTiles][4], dp[kSTiles][4], dq[8][4];
    uint32_t p_frag[kSlices][4], ds_frag[kSlices][4];
    q.wait_full(sm.q_full(stage));
    issue_s_dp(s, dp, stage);
    // Dropout's Philox draws: integer work while the tensor cores run S^T and dP^T.
    uint32_t keep[kKeepWords];
    if constexpr (Mask::kDropout)
      draw_keep(keep, blk, blk.seq.batch * p.heads + blk.head(s_idx, p.heads / p.heads_k), first_row);

    if constexpr (Mask::kSoftcap) {
      wgmma_wait<0>();
      fence_operand(s);
      fence_operand(dp);
      softcap_p_and_ds(s, dp, blk, first_row, stage, p.scale_log2);
    } else {
      wgmma_wait<1>();  // S^T done; dP^T may still run
      fence_operand(s);
#if !FAT_BWD_TIMING_SKIP_ELEMENTWISE
      scores_to_p(s, blk, first_row, stage, p.scale_log2,
                  Mask::kAlibi ? blk.mask.alibi_coef(blk.head(s_idx, p.heads / p.heads_k)) : 0.f);
#endif
      wgmma_wait<0>();
      fence_operand(dp);
      // dS before packing either: P^T in fp32 and dP^T die as they are packed, so at most
      // S^T, dP^T and dK, dV are live at once (hd64 at BlockM 128 would spill otherwise).
#if !FAT_BWD_TIMING_SKIP_ELEMENTWISE
      dp_to_ds(dp, s, stage, keep, blk.mask.dropout_scale);
#endif
    }
    pack_a_fragments<Element>(s, p_frag);
    if constexpr (Mask::kDropout) drop(p_frag, keep);  // dV takes the kept P (scaled by 1 / p_keep at the store)
    pack_a_fragments<Element>(dp, ds_frag);
    if constexpr (kLate) {
      // Before dV is issued, not between register-sourced wgmmas in flight: this step's buffer
      // was read by the dQ of two steps back; the other warpgroup's half of the previous step.
      ds.wait_empty(sm.ds_free(ds.stage()));
      if (has_dq) dq_of.wait_full(sm.ds_full(dq_of.stage()));
    }
    // Tensor-core work queued around the waits of this warpgroup: dV += P^T dO runs while dS^T is
    // stored (and the other warpgroup's half is awaited), dK += dS^T Q while dQ is staged.
    issue_kv_grad(dv, p_frag, sm.dout(stage));
    store_ds(ds_frag, ds.stage());
    fence_proxy_async();  // plain stores, read next by wgmma (async proxy)
    if constexpr (kLate) {
      mbar_arrive(sm.ds_full(ds.stage()));
      issue_dq(dq, has_dq ? sm.ds(dq_of.stage()) : sm.k());
    } else {
      Barriers::bwd_ds_ready().sync();
      issue_dq(dq, sm.ds(dq_of.stage()));
    }
    issue_kv_grad(dk, ds_frag, sm.q(stage));
    wgmma_wait<1>();  // dV and dQ done
    if (has_dq) {
      if constexpr (kLate) warp_release(sm.ds_free(dq_of.stage()));
      stage_dq(dq, dq_slot);
    }
    wgmma_wait<0>();
    fence_operand(dk);
    fence_operand(dv);
    // Q, dO, lse and D of this step read. Every thread arrives: the lse/D rows are rewritten by
    // plain stores, which must be ordered after each thread's own reads.
    mbar_arrive(sm.q_empty(stage));
  }

  __device__ __forceinline__ void run(const BwdParams& p) const {
    RingPosition<1> kv, dq_slot;
    RingPosition<Traits::kStages> q;
    RingPosition<2> ds;  // the step's dS^T buffer
    for_each_key_block<Traits, Mask>(p, [&](const BwdKeyBlock<Traits, Mask>& blk) {
      if (!blk.exists()) return;
      float dk[kKvTiles][4], dv[kKvTiles][4];
      zero(dk);
      zero(dv);
      if (blk.steps > 0) kv.wait_full(sm.kv_full());
      for (int s_idx = 0; s_idx < blk.steps; ++s_idx, q = q.plus(1), ds = ds.plus(1))
        step(p, blk, s_idx, q, ds, dq_slot, dk, dv);
      if (blk.steps > 0) {
        if constexpr (Traits::kDqOneStepLate) {  // the last step's dQ (it reads K: before K/V are released)
          const RingPosition<2> last = ds.plus(-1);
          float dq[8][4];
          last.wait_full(sm.ds_full(last.stage()));
          issue_dq(dq, sm.ds(last.stage()));
          wgmma_wait<0>();
          warp_release(sm.ds_free(last.stage()));
          stage_dq(dq, dq_slot);
        }
        warp_release(sm.kv_empty());
        kv = kv.plus(1);
      }
      // dV of the kept P: times 1 / p_keep with dropout
      store_kv_grads(p, blk, key_of(0), col_of(0, 0), dk, dv, Mask::kDropout ? blk.mask.dropout_scale : 1.f);
    });
  }
};

template <typename Traits, typename Mask>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ CUtensorMap tma_q,
               const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v,
               const __grid_constant__ CUtensorMap tma_do) {
#ifdef FAT_SM90_DEVICE
  extern __shared__ char smem_raw[];
  const BwdSmem<Traits> sm(smem_raw);
  constexpr int kConsumerThreads = 128 * Traits::kConsumerWarpgroups;
  if (threadIdx.x == 0) {
    init_ring_barriers(sm);
    mbar_init(sm.dq_full(), kConsumerThreads);  // every consumer thread, after its fence
    mbar_init(sm.dq_empty(), 1);
    for (int b = 0; Traits::kDqOneStepLate && b < 2; ++b) {
      mbar_init(sm.ds_full(b), kConsumerThreads);        // every consumer thread, after its fence
      mbar_init(sm.ds_free(b), kConsumerThreads / 32);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int warpgroup = warp_uniform(threadIdx.x / 128), warp = threadIdx.x / 32;
  if (warpgroup == 0) {
    regs_decrease<Traits::kProducerRegisters>();
    if (warp == 0 && threadIdx.x == 0) load_tiles<Traits, Mask>(p, &tma_q, &tma_k, &tma_v, &tma_do, sm);
    if (warp == 1) load_row_stats<Traits, Mask>(p, sm);
    if (warp == 2 && threadIdx.x == 64) drain_dq<Traits, Mask>(p, sm);
  } else {
    regs_increase<Traits::kConsumerRegisters>();
    BwdConsumer<Traits, Mask>(sm, warpgroup - 1).run(p);
  }
#endif
}

}  // namespace fat::sm90
