// The hd256 backward's dQ (BwdDqTraits), a kernel of its own beside the dK / dV kernel of
// bwd_split_dim.h: a CTA owns 128 query rows and walks the key blocks they see, recomputing
// S = Q K^T and dP = dO V^T per block, and keeps dQ += dS K in registers. At head dim 256 adding
// each key block's dQ into global memory from the dK / dV kernel moved 64 KB per 64 x 64 step
// through L2 reductions (twice hd128's bytes per FLOP), which bound that kernel; recomputing two
// GEMMs here costs less. dQ is written once, as plain stores into dq_accum's split 0 (the dsum
// pass cleared it; the conversion pass scales it), so the result is deterministic.
#pragma once
#include "bwd_kernel.h"

namespace fat::sm90 {

template <typename Traits>
struct BwdDqSmem {
  using Element = typename Traits::Element;
  char* base;
  __device__ __forceinline__ explicit BwdDqSmem(char* raw) : base(raw + ((1024 - (smem_addr(raw) & 1023)) & 1023)) {}
  template <typename T = Element>
  __device__ __forceinline__ T* at(uint32_t offset) const {
    return reinterpret_cast<T*>(base + offset);
  }
  __device__ __forceinline__ Element* q() const { return at(Traits::kQOffset); }
  __device__ __forceinline__ Element* dout() const { return at(Traits::kDoOffset); }
  __device__ __forceinline__ Element* k(int stage) const { return at(Traits::kKOffset + stage * Traits::kKVBytes); }
  __device__ __forceinline__ Element* v() const { return at(Traits::kVOffset); }
  __device__ __forceinline__ uint64_t* barriers() const { return at<uint64_t>(Traits::kBarrierOffset); }
  __device__ __forceinline__ uint64_t* q_full() const { return barriers(); }
  __device__ __forceinline__ uint64_t* k_full(int stage) const { return barriers() + 1 + stage; }
  __device__ __forceinline__ uint64_t* k_empty(int stage) const { return barriers() + 1 + Traits::kKStages + stage; }
  __device__ __forceinline__ uint64_t* v_full() const { return barriers() + 1 + 2 * Traits::kKStages; }
  __device__ __forceinline__ uint64_t* v_empty() const { return v_full() + 1; }
};

// One CTA's query block of one (q head, batch) and the key blocks [n_begin, n_end) it sees.
template <typename Traits, typename Mask>
struct BwdQueryBlock {
  SeqInfo seq;
  Mask mask;
  int head, head_k, first_row, n_begin, n_end;
  __device__ __forceinline__ BwdQueryBlock(const BwdParams& p)
      : seq(p, blockIdx.z), mask(seq, p), head(blockIdx.y), head_k(blockIdx.y / (p.heads / p.heads_k)) {
    first_row = blockIdx.x * Traits::kBlockM;
    n_begin = mask.n_begin(first_row, Traits::kBlockN);
    n_end = first_row < seq.len_q ? mask.n_end(first_row, Traits::kBlockM, Traits::kBlockN) : 0;
  }
  __device__ __forceinline__ int blocks() const { return max(0, n_end - n_begin); }
  __device__ __forceinline__ int first_key(int i) const { return (n_begin + i) * Traits::kBlockN; }
  __device__ __forceinline__ int batch_coord() const { return seq.varlen ? 0 : seq.batch; }
};

// ---- producer, one thread: Q and dO once, then K (two stages) and V (one) per key block.
template <typename Traits, typename Mask>
__device__ __forceinline__ void load_dq_tiles(const BwdQueryBlock<Traits, Mask>& blk, const CUtensorMap* tma_q,
                                              const CUtensorMap* tma_k, const CUtensorMap* tma_v,
                                              const CUtensorMap* tma_do, const BwdDqSmem<Traits>& sm) {
  constexpr int kSlabElems = 64, kSlabs = Traits::kHeadDim / 64;
  const int b = blk.batch_coord(), row = static_cast<int>(blk.seq.first_q) + blk.first_row;
  mbar_arrive_expect_tx(sm.q_full(), 2 * Traits::kQBytes);
#pragma unroll
  for (int slab = 0; slab < kSlabs; ++slab) {
    tma_load_4d(sm.q() + slab * Traits::kBlockM * kSlabElems, tma_q, sm.q_full(), slab * kSlabElems, row, blk.head, b);
    tma_load_4d(sm.dout() + slab * Traits::kBlockM * kSlabElems, tma_do, sm.q_full(), slab * kSlabElems, row,
                blk.head, b);
  }
  RingPosition<Traits::kKStages> k;
  RingPosition<1> v;
  for (int i = 0; i < blk.blocks(); ++i, k = k.plus(1), v = v.plus(1)) {
    const int key_row = static_cast<int>(blk.seq.first_k) + blk.first_key(i), stage = k.stage();
    k.wait_empty(sm.k_empty(stage));
    mbar_arrive_expect_tx(sm.k_full(stage), Traits::kKVBytes);
#pragma unroll
    for (int slab = 0; slab < kSlabs; ++slab)
      tma_load_4d(sm.k(stage) + slab * Traits::kBlockN * kSlabElems, tma_k, sm.k_full(stage), slab * kSlabElems,
                  key_row, blk.head_k, b);
    v.wait_empty(sm.v_empty());
    mbar_arrive_expect_tx(sm.v_full(), Traits::kKVBytes);
#pragma unroll
    for (int slab = 0; slab < kSlabs; ++slab)
      tma_load_4d(sm.v() + slab * Traits::kBlockN * kSlabElems, tma_v, sm.v_full(), slab * kSlabElems, key_row,
                  blk.head_k, b);
  }
}

// A tile's address hidden from ptxas, so that the wgmma descriptors built from it are computed
// where they are used: Q, dO and V never move, and their 48 descriptors hoisted out of the key
// loop took registers the loop spilled (~50 words a block).
template <typename T>
__device__ __forceinline__ const T* opaque(const T* tile) {
  asm volatile("" : "+l"(tile));
  return tile;
}

template <typename Traits, typename Mask>
struct BwdDqConsumer {
  using Element = typename Traits::Element;
  static constexpr int kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  static constexpr int kSTiles = kBlockN / 8;  // 8-column tiles of S, dP (keys)
  static constexpr int kDqN = 128;             // dQ += dS K as wgmmas of N = 128 head-dim columns
  static constexpr int kDqChunks = kHeadDim / kDqN, kDqTiles = kDqN / 8;
  static constexpr int kSlices = kBlockN / 16;  // k16 slices of dS as A operands
  static constexpr int kSlabElems = 64;
  static_assert(!Mask::kDropout, "head dim 256: no dropout (flash_api)");

  const BwdDqSmem<Traits>& sm;
  const BwdQueryBlock<Traits, Mask>& blk;
  const int wg, lane, warp_row;  // warp_row: this warp's first row of the warpgroup's 64
  const int wg_row;              // the warpgroup's first row in the sequence

  __device__ __forceinline__ BwdDqConsumer(const BwdDqSmem<Traits>& sm_, const BwdQueryBlock<Traits, Mask>& blk_,
                                           int warpgroup)
      : sm(sm_), blk(blk_), wg(warpgroup), lane(threadIdx.x % 32), warp_row(threadIdx.x / 32 % 4 * 16),
        wg_row(blk_.first_row + 64 * warpgroup) {}

  // Accumulator element [t][j] (m16n8 layout per warp): its row in the warpgroup's 64 and its
  // column (key of S / dP, or head-dim column of a dQ chunk).
  __device__ __forceinline__ int row_of(int j) const { return warp_row + lane / 4 + 8 * (j / 2); }
  __device__ __forceinline__ int col_of(int t, int j) const { return 8 * t + 2 * (lane % 4) + j % 2; }

  // Turns: the two warpgroups take turns issuing GEMMs (each turn's GEMMs one group or two), so
  // one's element-wise work runs beside the other's GEMMs. Each takes 2 x blocks + 1 turns;
  // warpgroup 1 gives warpgroup 0 the first (bwd_kernel_dq).
  __device__ __forceinline__ void wait_turn() const { Barriers::bwd_dq_turn(wg).sync(); }
  __device__ __forceinline__ void pass_turn() const { Barriers::bwd_dq_turn(wg ^ 1).arrive(); }

  // S = Q K^T (resp. dP = dO V^T) for this warpgroup's 64 rows over the block's 64 keys (K = 256),
  // issued as one group: rows_tile is Q (dO), keys_tile K (V).
  __device__ __forceinline__ void issue_scores(float (&acc)[kSTiles][4], const Element* rows_tile,
                                               const Element* keys_tile) const {
    const Element *rows = opaque(rows_tile), *keys = opaque(keys_tile);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      wgmma_ss<Element, kBlockN>(acc, kmajor_desc(rows, Traits::kBlockM, 64 * wg, kk),
                                 kmajor_desc(keys, kBlockN, 0, kk), kk > 0);
    wgmma_commit();
  }
  __device__ __forceinline__ void issue_s(float (&s)[kSTiles][4], int stage) const {
    issue_scores(s, sm.q(), sm.k(stage));
  }
  __device__ __forceinline__ void issue_dp(float (&dp)[kSTiles][4]) const { issue_scores(dp, sm.dout(), sm.v()); }

  // S -> P = exp2(S scale_log2 - lse log2 e), with ALiBi's bias first (alibi_coef: the head's,
  // Variant::alibi_coef), 0 where masked; only blocks that reach past the end or cross a mask
  // edge test elements (two loops, as in the other backward consumers).
  __device__ __forceinline__ void scores_to_p(float (&s)[kSTiles][4], int first_key, const float (&lse)[2],
                                              float scale_log2, float alibi_coef) const {
    if (blk.mask.block_needs_mask(wg_row, 64, first_key, kBlockN))
      exponentiate<true>(s, first_key, lse, scale_log2, alibi_coef);
    else
      exponentiate<false>(s, first_key, lse, scale_log2, alibi_coef);
  }
  template <bool MaskElements>
  __device__ __forceinline__ void exponentiate(float (&s)[kSTiles][4], int first_key, const float (&lse)[2],
                                               float scale_log2, float alibi_coef) const {
    // ALiBi: the query position (row + shift) and key of element (t, j) are these lane bases plus
    // 8 (j / 2) and 8 t + j % 2 (row_of, col_of)
    const float alibi_position = static_cast<float>(wg_row + blk.mask.shift + row_of(0));
    const float alibi_key = static_cast<float>(first_key + col_of(0, 0));
#pragma unroll
    for (int t = 0; t < kSTiles; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (Mask::kAlibi)
          s[t][j] = blk.mask.alibi_bias(s[t][j], alibi_coef, alibi_position + static_cast<float>(8 * (j / 2)),
                                        alibi_key + static_cast<float>(8 * t + j % 2));
        float p = fast_exp2(fmaf(s[t][j], scale_log2, -lse[j / 2]));
        if constexpr (MaskElements) {
          if (blk.mask.masked(wg_row + row_of(j), first_key + col_of(t, j))) p = 0.f;
        }
        s[t][j] = p;
      }
  }

  // Softcap: S and dP -> dS = P (dP - D) (1 - t^2) with t = tanh(S softcap_scale) and
  // P = exp2(t scale_log2 - lse log2 e), in one pass once both GEMMs are done (t would otherwise
  // take a tile of registers beside P).
  __device__ __forceinline__ void softcap_ds(const float (&s)[kSTiles][4], float (&dp)[kSTiles][4], int first_key,
                                             const float (&lse)[2], const float (&dsum)[2], float scale_log2) const {
    if (blk.mask.block_needs_mask(wg_row, 64, first_key, kBlockN))
      softcap_ds<true>(s, dp, first_key, lse, dsum, scale_log2);
    else
      softcap_ds<false>(s, dp, first_key, lse, dsum, scale_log2);
  }
  template <bool MaskElements>
  __device__ __forceinline__ void softcap_ds(const float (&s)[kSTiles][4], float (&dp)[kSTiles][4], int first_key,
                                             const float (&lse)[2], const float (&dsum)[2], float scale_log2) const {
#pragma unroll
    for (int t = 0; t < kSTiles; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float score = blk.mask.score(s[t][j]);
        float p = fast_exp2(fmaf(score, scale_log2, -lse[j / 2]));
        if constexpr (MaskElements) {
          if (blk.mask.masked(wg_row + row_of(j), first_key + col_of(t, j))) p = 0.f;
        }
        dp[t][j] = p * (dp[t][j] - dsum[j / 2]) * blk.mask.score_grad(score);
      }
  }

  // dP -> dS = P (dP - D) (softcap: s holds the raw scores and softcap_ds makes dS), packed as the
  // A fragments of dQ += dS K.
  __device__ __forceinline__ void ds_fragments(const float (&s)[kSTiles][4], float (&dp)[kSTiles][4], int first_key,
                                               const float (&lse)[2], const float (&dsum)[2], float scale_log2,
                                               uint32_t (&a)[kSlices][4]) const {
    if constexpr (Mask::kSoftcap) {
      softcap_ds(s, dp, first_key, lse, dsum, scale_log2);
    } else {
#pragma unroll
      for (int t = 0; t < kSTiles; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j) dp[t][j] = s[t][j] * (dp[t][j] - dsum[j / 2]);
    }
    pack_a_fragments<Element, kSlices>(dp, a);
  }

  // dQ += dS K over the block's 64 keys: K's rows as the K dimension, its head-dim columns as N
  // (a transposed B), one chunk of 128 columns (two slabs) per wgmma.
  __device__ __forceinline__ void issue_dq(float (&dq)[kDqChunks][kDqTiles][4], const uint32_t (&a)[kSlices][4],
                                           int stage) const {
    const Element* k = opaque(sm.k(stage));
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < kDqChunks; ++c)
#pragma unroll
      for (int kk = 0; kk < kSlices; ++kk)
        wgmma_rs<Element, kDqN>(dq[c], a[kk],
                                mn_major_desc(k + c * (kDqN / 64) * kBlockN * kSlabElems, kBlockN, kk), 1);
    wgmma_commit();
  }

  // dQ (unscaled: the conversion pass multiplies by softmax_scale) into dq_accum's split 0, its
  // columns swizzled (dq_accum_col), rows past the sequence's end skipped.
  __device__ __forceinline__ void store_dq(const BwdParams& p, const float (&dq)[kDqChunks][kDqTiles][4]) const {
    float* rows = p.dq_accum + blk.seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride) +
                  blk.head * p.dq_accum_head_stride + wg_row * p.dq_accum_row_stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_of(2 * r);
      if (wg_row + row >= blk.seq.len_q) continue;
#pragma unroll
      for (int c = 0; c < kDqChunks; ++c)
#pragma unroll
        for (int t = 0; t < kDqTiles; ++t)
          *reinterpret_cast<float2*>(rows + row * p.dq_accum_row_stride + dq_accum_col(row, kDqN * c + col_of(t, 0))) =
              make_float2(dq[c][t][2 * r], dq[c][t][2 * r + 1]);
    }
  }

  __device__ __forceinline__ void run(const BwdParams& p) const {
    constexpr float kLog2e = 1.4426950408889634f;
    // This thread's two rows' lse (log2 units) and D; rows past the end get lse = +inf and D = 0,
    // so their P and dS are exactly 0 whatever TMA brought for them.
    float lse[2], dsum[2];
    const int64_t stats = blk.seq.lse_offset(p, blk.head);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wg_row + row_of(2 * r);
      const bool valid = row < blk.seq.len_q;
      lse[r] = valid ? p.lse[stats + row] * kLog2e : INFINITY;
      dsum[r] = valid ? p.dsum[stats + row] : 0.f;
    }
    const float alibi_coef = blk.mask.alibi_coef(blk.head);
    float dq[kDqChunks][kDqTiles][4];
#pragma unroll
    for (int c = 0; c < kDqChunks; ++c)
#pragma unroll
      for (int t = 0; t < kDqTiles; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j) dq[c][t][j] = 0.f;
    // Per block i two turns: {dQ(i-1), S(i)}, then {dP(i)}. P(i) runs beside the other warpgroup's
    // first turn, dS(i) beside its second. V is read only by dP, so its one stage is refilled
    // while three turns of GEMMs run. K(i-1) is released after the first turn, so K(i+1) has
    // both warpgroups' second turns to land in its slot (S(i) before dQ(i-1) would let P(i)
    // start one GEMM earlier but hold K(i-1) until dP(i): K(i+1) would then land late).
    const int n = blk.blocks();
    const RingPosition<Traits::kKStages> k;
    const RingPosition<1> v;
    float s[kSTiles][4], dp[kSTiles][4];
    uint32_t a[kSlices][4];
    mbar_wait(sm.q_full(), 0);
    k.wait_full(sm.k_full(k.stage()));
    wait_turn();
    issue_s(s, k.stage());
    pass_turn();
    wgmma_wait<0>();
    fence_operand(s);
    if constexpr (!Mask::kSoftcap) scores_to_p(s, blk.first_key(0), lse, p.scale_log2, alibi_coef);
    v.wait_full(sm.v_full());
    wait_turn();
    issue_dp(dp);
    pass_turn();
    wgmma_wait<0>();
    fence_operand(dp);
    warp_release(sm.v_empty());
    ds_fragments(s, dp, blk.first_key(0), lse, dsum, p.scale_log2, a);
    for (int i = 1; i < n; ++i) {
      const RingPosition<Traits::kKStages> k_this = k.plus(i), k_last = k.plus(i - 1);
      k_this.wait_full(sm.k_full(k_this.stage()));
      wait_turn();
      issue_dq(dq, a, k_last.stage());
      issue_s(s, k_this.stage());
      pass_turn();
      wgmma_wait<0>();
      fence_operand(s);
#pragma unroll
      for (int c = 0; c < kDqChunks; ++c) fence_operand(dq[c]);
      warp_release(sm.k_empty(k_last.stage()));  // K(i-1) read (dQ(i-1) done)
      if constexpr (!Mask::kSoftcap) scores_to_p(s, blk.first_key(i), lse, p.scale_log2, alibi_coef);
      v.plus(i).wait_full(sm.v_full());
      wait_turn();
      issue_dp(dp);
      pass_turn();
      wgmma_wait<0>();
      fence_operand(dp);
      warp_release(sm.v_empty());  // V(i) read (dP(i) done)
      ds_fragments(s, dp, blk.first_key(i), lse, dsum, p.scale_log2, a);
    }
    wait_turn();
    issue_dq(dq, a, k.plus(n - 1).stage());
    if (wg == 0) pass_turn();  // (warpgroup 1's would be an arrival nobody waits for)
    wgmma_wait<0>();
#pragma unroll
    for (int c = 0; c < kDqChunks; ++c) fence_operand(dq[c]);
    store_dq(p, dq);
  }
};

template <typename Traits, typename Mask>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_kernel_dq(const __grid_constant__ BwdParams p, const __grid_constant__ CUtensorMap tma_q,
                  const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v,
                  const __grid_constant__ CUtensorMap tma_do) {
#ifdef FAT_SM90_DEVICE
  extern __shared__ char smem_raw[];
  const BwdDqSmem<Traits> sm(smem_raw);
  const BwdQueryBlock<Traits, Mask> blk(p);
  if (blk.blocks() == 0) return;  // rows past the sequence, or seeing no key: dQ stays 0
  constexpr int kConsumerWarps = 4 * Traits::kConsumerWarpgroups;
  if (threadIdx.x == 0) {
    mbar_init(sm.q_full(), 1);
    for (int s = 0; s < Traits::kKStages; ++s) {
      mbar_init(sm.k_full(s), 1);
      mbar_init(sm.k_empty(s), kConsumerWarps);  // one arrival per consumer warp
    }
    mbar_init(sm.v_full(), 1);
    mbar_init(sm.v_empty(), kConsumerWarps);
    mbar_init_fence();
  }
  __syncthreads();

  const int warpgroup = warp_uniform(threadIdx.x / 128);
  if (warpgroup == 0) {
    regs_decrease<Traits::kProducerRegisters>();
    if (threadIdx.x == 0) load_dq_tiles<Traits, Mask>(blk, &tma_q, &tma_k, &tma_v, &tma_do, sm);
  } else {
    regs_increase<Traits::kConsumerRegisters>();
    if (warpgroup == 2) Barriers::bwd_dq_turn(0).arrive();  // the first turn is warpgroup 0's
    BwdDqConsumer<Traits, Mask>(sm, blk, warpgroup - 1).run(p);
  }
#endif
}

}  // namespace fat::sm90
