// The sm90 backward's dK and dV at head dim 256 (BwdSplitDimTraits; dQ is bwd_dq.h's kernel):
// TMA producer warps as in bwd_kernel.h (load_tiles, load_row_stats), two consumer warpgroups
// that split each step's S^T / dP^T by query columns and dK, dV by head-dim columns, with P^T and
// dS^T exchanged through shared memory.
#pragma once
#include "bwd_kernel.h"

namespace fat::sm90 {

template <typename Traits, typename Mask>
struct BwdSplitDimConsumer {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHalfM = Traits::kHalfM;
  static constexpr int kHalfDim = Traits::kHalfDim;
  static constexpr int kSTiles = kHalfM / 8;     // 8-column tiles of this warpgroup's S^T, dP^T (queries)
  static constexpr int kDimTiles = kHalfDim / 8;  // of its dK, dV (head-dim columns)
  static constexpr int kSlabElems = 64;
  static_assert(!Mask::kDropout, "head dim 256: no dropout (flash_api)");

  const BwdSmem<Traits>& sm;
  const int wg, lane, warp_row;  // warp_row: this warp's first key row of 64

  __device__ __forceinline__ BwdSplitDimConsumer(const BwdSmem<Traits>& sm_, int warpgroup)
      : sm(sm_), wg(warpgroup), lane(threadIdx.x % 32), warp_row(threadIdx.x / 32 % 4 * 16) {}

  // Accumulator element [t][j] (m16n8 layout per warp): its row (key) and, for S^T / dP^T, its
  // query in the block; for dK / dV its head-dim column.
  __device__ __forceinline__ int row_of(int j) const { return warp_row + lane / 4 + 8 * (j / 2); }
  __device__ __forceinline__ int query_of(int t, int j) const { return kHalfM * wg + 8 * t + 2 * (lane % 4) + j % 2; }
  __device__ __forceinline__ int dim_of(int t) const { return kHalfDim * wg + 8 * t + 2 * (lane % 4); }
  // The P^T (which = 0) or dS^T (1) tile of P/dS buffer `buffer`: 64 keys x 64 queries, one slab.
  __device__ __forceinline__ Element* pds(int buffer, int which) const { return sm.ds(2 * buffer + which); }
  // Head-dim columns [128 wg, 128 wg + 128) of a 256-column tile of `rows` rows: its slab 2 wg.
  __device__ __forceinline__ const Element* dim_half(const Element* tile, int rows) const {
    return tile + 2 * wg * rows * kSlabElems;
  }

  // S^T and dP^T of this warpgroup's queries over all 64 keys (K = 256), issued as two groups.
  __device__ __forceinline__ void issue_s_dp(float (&s)[kSTiles][4], float (&dp)[kSTiles][4], int stage) const {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk)
      wgmma_ss<Element, kHalfM>(s, kmajor_desc(sm.k(), kBlockN, 0, kk),
                                kmajor_desc(sm.q(stage), kBlockM, kHalfM * wg, kk), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk)
      wgmma_ss<Element, kHalfM>(dp, kmajor_desc(sm.v(), kBlockN, 0, kk),
                                kmajor_desc(sm.dout(stage), kBlockM, kHalfM * wg, kk), kk > 0);
    wgmma_commit();
  }

  // S^T -> P^T = exp2(S^T scale_log2 - lse log2 e), with ALiBi's bias first (alibi_coef: the
  // step's head's, Variant::alibi_coef), 0 where masked (two loops, as the hd64/128 consumer: a
  // per-element test in every block made predicated compares of every element).
  __device__ __forceinline__ void scores_to_p(float (&s)[kSTiles][4], const BwdKeyBlock<Traits, Mask>& blk,
                                              int first_row, int stage, float scale_log2, float alibi_coef) const {
    if (blk.mask.block_needs_mask(first_row + kHalfM * wg, kHalfM, blk.first_key, kBlockN))
      exponentiate<true>(s, blk, first_row, stage, scale_log2, alibi_coef);
    else
      exponentiate<false>(s, blk, first_row, stage, scale_log2, alibi_coef);
  }
  template <bool MaskElements>
  __device__ __forceinline__ void exponentiate(float (&s)[kSTiles][4], const BwdKeyBlock<Traits, Mask>& blk,
                                               int first_row, int stage, float scale_log2, float alibi_coef) const {
    const float* lse = sm.lse_log2(stage);
    // ALiBi: the query position (row + shift) and key of element (t, j) are these lane bases plus
    // 8 t + j % 2 and 8 (j / 2) (query_of, row_of)
    const float alibi_position = static_cast<float>(first_row + blk.mask.shift + query_of(0, 0));
    const float alibi_key = static_cast<float>(blk.first_key + row_of(0));
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
      const float2 l = *reinterpret_cast<const float2*>(lse + query_of(t, 0));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (Mask::kAlibi)
          s[t][j] = blk.mask.alibi_bias(s[t][j], alibi_coef, alibi_position + static_cast<float>(8 * t + j % 2),
                                        alibi_key + static_cast<float>(8 * (j / 2)));
        float p = fast_exp2(fmaf(s[t][j], scale_log2, -(j % 2 ? l.y : l.x)));
        if constexpr (MaskElements) {
          if (blk.mask.masked(first_row + query_of(t, j), blk.first_key + row_of(j))) p = 0.f;
        }
        s[t][j] = p;
      }
    }
  }

  // Softcap: S^T and dP^T -> P^T = exp2(t scale_log2 - lse log2 e) with t = tanh(S^T softcap_scale),
  // and dS^T = P^T (dP^T - D) (1 - t^2), in one pass once both GEMMs are done (t is needed by
  // both; keeping it beside P^T would cost a tile of registers).
  __device__ __forceinline__ void softcap_p_and_ds(float (&s)[kSTiles][4], float (&dp)[kSTiles][4],
                                                   const BwdKeyBlock<Traits, Mask>& blk, int first_row, int stage,
                                                   float scale_log2) const {
    if (blk.mask.block_needs_mask(first_row + kHalfM * wg, kHalfM, blk.first_key, kBlockN))
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
      const float2 l = *reinterpret_cast<const float2*>(lse + query_of(t, 0));
      const float2 d = *reinterpret_cast<const float2*>(dsum + query_of(t, 0));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float score = blk.mask.score(s[t][j]);
        float p = fast_exp2(fmaf(score, scale_log2, -(j % 2 ? l.y : l.x)));
        if constexpr (MaskElements) {
          if (blk.mask.masked(first_row + query_of(t, j), blk.first_key + row_of(j))) p = 0.f;
        }
        s[t][j] = p;
        dp[t][j] = p * (dp[t][j] - (j % 2 ? d.y : d.x)) * blk.mask.score_grad(score);
      }
    }
  }

  // dP^T -> dS^T = P^T (dP^T - D).
  __device__ __forceinline__ void dp_to_ds(float (&dp)[kSTiles][4], const float (&p)[kSTiles][4], int stage) const {
    const float* dsum = sm.dsum(stage);
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
      const float2 d = *reinterpret_cast<const float2*>(dsum + query_of(t, 0));
#pragma unroll
      for (int j = 0; j < 4; ++j) dp[t][j] = p[t][j] * (dp[t][j] - (j % 2 ? d.y : d.x));
    }
  }

  // This warpgroup's query columns of a P^T or dS^T tile (keys x queries, 128-byte swizzle): a
  // lane's column pair per 4-byte store.
  __device__ __forceinline__ void store_half(Element* tile, const float (&x)[kSTiles][4]) const {
    const uint32_t base = smem_addr(tile);
#pragma unroll
    for (int t = 0; t < kSTiles; ++t)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        st_shared_u32(base + swizzled_offset(kBlockN, row_of(2 * r), query_of(t, 0), sizeof(Element)),
                      Ops::pack(x[t][2 * r], x[t][2 * r + 1]));
  }

  // dV += P^T dO and dK += dS^T Q for this warpgroup's head-dim columns: A the whole P^T / dS^T
  // tile (keys x 64 queries), B the queries' rows of dO / Q (N-major: columns contiguous).
  __device__ __forceinline__ void issue_kv_grads(float (&dk)[kDimTiles][4], float (&dv)[kDimTiles][4], int buffer,
                                                 int stage) const {
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
      wgmma_ss<Element, kHalfDim, false, true>(dv, kmajor_desc(pds(buffer, 0), kBlockN, 0, kk),
                                               mn_major_desc(dim_half(sm.dout(stage), kBlockM), kBlockM, kk), 1);
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
      wgmma_ss<Element, kHalfDim, false, true>(dk, kmajor_desc(pds(buffer, 1), kBlockN, 0, kk),
                                               mn_major_desc(dim_half(sm.q(stage), kBlockM), kBlockM, kk), 1);
  }

  // One step: this warpgroup's S^T, dP^T -> P^T, dS^T into buffer `buffer`; once both halves are
  // there, dV and dK of its head-dim half. The other warpgroup reads this buffer until its
  // own GEMMs of the step are done, and it is written again two steps later: by then both
  // warpgroups have met at the next step's barrier, which each reaches only after those GEMMs.
  __device__ __forceinline__ void step(const BwdParams& p, const BwdKeyBlock<Traits, Mask>& blk, int s_idx,
                                       RingPosition<Traits::kStages> q, int buffer, float (&dk)[kDimTiles][4],
                                       float (&dv)[kDimTiles][4]) const {
    const int stage = q.stage(), first_row = blk.first_row(s_idx);
    float s[kSTiles][4], dp[kSTiles][4];
    q.wait_full(sm.q_full(stage));
    issue_s_dp(s, dp, stage);
    if constexpr (Mask::kSoftcap) {
      wgmma_wait<0>();
      fence_operand(s);
      fence_operand(dp);
      softcap_p_and_ds(s, dp, blk, first_row, stage, p.scale_log2);
    } else {
      wgmma_wait<1>();  // S^T done; dP^T may still run
      fence_operand(s);
      scores_to_p(s, blk, first_row, stage, p.scale_log2, blk.mask.alibi_coef(blk.head(s_idx, p.heads / p.heads_k)));
      wgmma_wait<0>();
      fence_operand(dp);
      dp_to_ds(dp, s, stage);
    }
    store_half(pds(buffer, 0), s);
    store_half(pds(buffer, 1), dp);
    fence_proxy_async();  // plain stores, read next by wgmma (async proxy)
    Barriers::bwd_ds_ready().sync();
    wgmma_fence();
    issue_kv_grads(dk, dv, buffer, stage);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(dk);
    fence_operand(dv);
    // Q, dO, lse and D of this step read. Every thread arrives: the lse/D rows are rewritten by
    // plain stores, which must be ordered after each thread's own reads.
    mbar_arrive(sm.q_empty(stage));
  }

  __device__ __forceinline__ void run(const BwdParams& p) const {
    RingPosition<1> kv;
    RingPosition<Traits::kStages> q;
    int buffer = 0;  // the step's P/dS buffer
    for_each_key_block<Traits, Mask>(p, [&](const BwdKeyBlock<Traits, Mask>& blk) {
      if (!blk.exists()) return;
      float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j) dk[t][j] = dv[t][j] = 0.f;
      if (blk.steps > 0) kv.wait_full(sm.kv_full());
      for (int s_idx = 0; s_idx < blk.steps; ++s_idx, q = q.plus(1), buffer ^= 1) step(p, blk, s_idx, q, buffer, dk, dv);
      if (blk.steps > 0) {
        warp_release(sm.kv_empty());
        kv = kv.plus(1);
      }
      store_kv_grads(p, blk, row_of(0), dim_of(0), dk, dv, 1.f);
    });
  }
};

template <typename Traits, typename Mask>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_kernel_split_dim(const __grid_constant__ BwdParams p, const __grid_constant__ CUtensorMap tma_q,
                         const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v,
                         const __grid_constant__ CUtensorMap tma_do) {
#ifdef FAT_SM90_DEVICE
  extern __shared__ char smem_raw[];
  const BwdSmem<Traits> sm(smem_raw);
  if (threadIdx.x == 0) {
    init_ring_barriers(sm);
    mbar_init_fence();
  }
  __syncthreads();

  const int warpgroup = warp_uniform(threadIdx.x / 128), warp = threadIdx.x / 32;
  if (warpgroup == 0) {
    regs_decrease<Traits::kProducerRegisters>();
    if (warp == 0 && threadIdx.x == 0) load_tiles<Traits, Mask>(p, &tma_q, &tma_k, &tma_v, &tma_do, sm);
    if (warp == 1) load_row_stats<Traits, Mask>(p, sm);
  } else {
    regs_increase<Traits::kConsumerRegisters>();
    BwdSplitDimConsumer<Traits, Mask>(sm, warpgroup - 1).run(p);
  }
#endif
}

}  // namespace fat::sm90
