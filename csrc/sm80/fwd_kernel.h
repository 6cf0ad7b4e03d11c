// sm80 forward: mma.sync m16n8k16 + ldmatrix + cp.async, online softmax in registers.
// Grid: (query blocks, heads, batch). Key blocks are walked from the last one down, so the
// blocks that need masking (causal diagonal, ragged end) come first.
#pragma once
#include <cmath>

#include "../common/mask.h"
#include "../common/ptx.h"
#include "../common/seq_info.h"
#include "../common/smem_tile.h"
#include "../common/softmax.h"
#include "../params.h"

namespace fat::sm80 {

// S = Q K^T for this warp's rows and the block's keys.
template <typename Traits>
__device__ __forceinline__ void qk_scores(float (&s)[Traits::kMTiles][Traits::kSTiles][4], uint32_t q_a,
                                          uint32_t k_b, int warp_row) {
  using Ops = ElementOps<typename Traits::Element>;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
#pragma unroll
  for (int mt = 0; mt < Traits::kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < Traits::kSTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.f;
  // With Traits::kPrefetch the ldmatrix of the next K fragment (and at the end of a k16 slice,
  // of the next Q fragments) is issued before the MMAs of the current one, so the MMAs do not
  // wait on the load right before them (ncu, hd128: short-scoreboard stalls 2.5x FA2's).
  constexpr int kPairs = Traits::kSTiles / 2, kSteps = Traits::kHeadDim / 16 * kPairs;
  uint32_t a[2][Traits::kMTiles][4], b[2][4];
  auto load_step = [&](int i) {
    const int kk = i / kPairs, np = i % kPairs;
    if (np == 0)
#pragma unroll
      for (int mt = 0; mt < Traits::kMTiles; ++mt)
        ldmatrix_x4(a[kk % 2][mt], Frag<QTile>::at(q_a, warp_row + mt * 16, kk * 16));
    ldmatrix_x4(b[i % 2], Frag<KVTile>::at(k_b, np * 16, kk * 16));
  };
  if (Traits::kPrefetch) load_step(0);
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    if (!Traits::kPrefetch) load_step(i);
    else if (i + 1 < kSteps) load_step(i + 1);
    const int kk = i / kPairs, np = i % kPairs;
#pragma unroll
    for (int mt = 0; mt < Traits::kMTiles; ++mt) {
      Ops::mma(s[mt][2 * np], a[kk % 2][mt], b[i % 2][0], b[i % 2][1]);
      Ops::mma(s[mt][2 * np + 1], a[kk % 2][mt], b[i % 2][2], b[i % 2][3]);
    }
  }
}

// O += P V with P re-packed from the score accumulators into A fragments (no shared-memory
// trip); the tensor form of the row sum rides along as P x ones. Dropout: the dropped elements
// are zeroed in the fragments after the row sum has taken them (keep: the lane's keep bits per
// row and 32-key group, Variant::dropout_bits).
template <typename Traits, bool Dropout, typename Softmax>
__device__ __forceinline__ void pv_accumulate(float (&o)[Traits::kMTiles][Traits::kOTiles][4],
                                              const float (&p)[Traits::kMTiles][Traits::kSTiles][4],
                                              uint32_t v_a, Softmax& softmax,
                                              const uint32_t (&keep)[Traits::kMTiles][2][Traits::kBlockN / 32]) {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using KVTile = typename Traits::KVTile;
#pragma unroll
  for (int kk = 0; kk < Traits::kBlockN / 16; ++kk) {
    uint32_t a[Traits::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < Traits::kMTiles; ++mt) {
      a[mt][0] = Ops::pack(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      a[mt][1] = Ops::pack(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      a[mt][2] = Ops::pack(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      a[mt][3] = Ops::pack(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
      softmax.template accumulate_row_sum<Element>(mt, a[mt]);
      if constexpr (Dropout) drop_a_fragment(a[mt], kk, keep[mt]);
    }
    // V fragments one ahead with Traits::kPrefetch, as in qk_scores.
    constexpr int kPairs = Traits::kOTiles / 2;
    uint32_t b[2][4];
    auto load_step = [&](int dp) { ldmatrix_x4_trans(b[dp % 2], Frag<KVTile>::at(v_a, kk * 16, dp * 16)); };
    if (Traits::kPrefetch) load_step(0);
#pragma unroll
    for (int dp = 0; dp < kPairs; ++dp) {
      if (!Traits::kPrefetch) load_step(dp);
      else if (dp + 1 < kPairs) load_step(dp + 1);
#pragma unroll
      for (int mt = 0; mt < Traits::kMTiles; ++mt) {
        Ops::mma(o[mt][2 * dp], a[mt], b[dp % 2][0], b[dp % 2][1]);
        Ops::mma(o[mt][2 * dp + 1], a[mt], b[dp % 2][2], b[dp % 2][3]);
      }
    }
  }
}

template <typename Traits, typename Mask>
__global__ void __launch_bounds__(Traits::kThreads)
    fwd_kernel(const __grid_constant__ FwdParams p) {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kThreads = Traits::kThreads;
  constexpr int kMTiles = Traits::kMTiles, kSTiles = Traits::kSTiles, kOTiles = Traits::kOTiles;

  // Under causal the last query blocks see the most keys: launch them first so the short ones
  // fill the tail of the grid.
  const int m_block = Mask::kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x, head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  if (m_block * kBlockM >= seq.len_q) return;
  const int head_k = head / (p.heads / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = warp * Traits::kRowsPerWarp;  // first row of this warp inside the block
  const Mask mask(seq, p);
  [[maybe_unused]] const int bh = seq.batch * p.heads + head;  // dropout's (batch, head) counter word
  const int first_row = m_block * kBlockM;
  const int valid_rows = min(kBlockM, seq.len_q - first_row);

  const Element* q = static_cast<const Element*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride) +
                     head * p.q_head_stride + first_row * p.q_row_stride;
  const Element* k = static_cast<const Element*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride) +
                     head_k * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride) +
                     head_k * p.v_head_stride;
  Element* out = static_cast<Element*>(p.out) + seq.out_offset(p.out_batch_stride, p.out_row_stride) +
                 head * p.out_head_stride + first_row * p.out_row_stride;
  float* lse = p.lse + seq.lse_offset(p, head) + first_row;

  const int n_begin = mask.n_begin(first_row, kBlockN), n_end = mask.n_end(first_row, kBlockM, kBlockN);

  extern __shared__ __align__(1024) char smem[];
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sK = sQ + QTile::kElements;
  Element* sV = sK + KVTile::kElements;
  const uint32_t q_a = Frag<QTile>::lane_a(smem_addr(sQ), lane), k_b = Frag<KVTile>::lane_b(smem_addr(sK), lane),
                 v_a = Frag<KVTile>::lane_a(smem_addr(sV), lane);

  float acc_o[kMTiles][kOTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int ot = 0; ot < kOTiles; ++ot)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_o[mt][ot][i] = 0.f;
  OnlineSoftmax<kMTiles, Traits::kTensorRowSum> softmax;

  // ---- prologue: Q and the last K block in flight
  if (n_end > n_begin) {
    load_tile_async<QTile, kThreads>(sQ, q, p.q_row_stride, valid_rows);
    const int n = n_end - 1;
    load_tile_async<KVTile, kThreads>(sK, k + n * kBlockN * p.k_row_stride, p.k_row_stride,
                                      seq.len_k - n * kBlockN);
    cp_async_commit();
  }

  // ---- main loop over key blocks, last to first
  for (int n = n_end - 1; n >= n_begin; --n) {
    const int first_col = n * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K[n] visible to all; every warp is done with V[n + 1]
    load_tile_async<KVTile, kThreads>(sV, v + first_col * p.v_row_stride, p.v_row_stride,
                                      seq.len_k - first_col);
    cp_async_commit();

    // Dropout's keep bits of this block (Variant::dropout_bits): drawn before S = Q K^T, while the
    // score accumulators are not live (fewer spills), the integer work beside the MMAs.
    uint32_t keep[kMTiles][2][kBlockN / 32];
    if constexpr (Mask::kDropout) {
      static_assert(kBlockN % 32 == 0, "dropout draws per 32-key group");
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        draw_keep_bits(keep[mt], mask, bh, first_row + warp_row + mt * 16, first_col);
    }
    float s[kMTiles][kSTiles][4];
    qk_scores<Traits>(s, q_a, k_b, warp_row);
    if constexpr (Mask::kSoftcap) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) s[mt][nt][j] = mask.score(s[mt][nt][j]);
    }
    if constexpr (Mask::kAlibi) add_alibi(s, mask, mask.alibi_coef(head), first_row + warp_row, first_col);

    if (mask.block_needs_mask(first_row, kBlockM, first_col, kBlockN))
      mask_scores(s, mask, first_row + warp_row, first_col);

    cp_async_wait<0>();
    __syncthreads();  // V[n] visible to all; every warp is done with K[n]
    if (n > n_begin) {
      load_tile_async<KVTile, kThreads>(sK, k + (n - 1) * kBlockN * p.k_row_stride, p.k_row_stride,
                                        seq.len_k - (n - 1) * kBlockN);
      cp_async_commit();
    }

    softmax.step(s, acc_o, p.scale_log2);
    pv_accumulate<Traits, Mask::kDropout>(acc_o, s, v_a, softmax, keep);
  }

  // ---- epilogue: normalise, stage O through this warp's own rows of sQ, 16-byte stores
  float row_lse[kMTiles][2];
  softmax.finalize(acc_o, p.scale_log2, row_lse, sink_log2(p, head));
  if constexpr (Mask::kDropout)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc_o[mt][ot][i] *= mask.dropout_scale;
  if (n_end > n_begin) __syncwarp();  // this warp's Q rows are no longer read (other warps' are theirs)
  const uint32_t o_pair = Frag<QTile>::lane_pair(smem_addr(sQ), lane);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row + mt * 16 + lane / 4 + 8 * r;
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot)
        st_shared_u32(Frag<QTile>::at(o_pair, warp_row + mt * 16 + 8 * r, ot * 8),
                      Ops::pack(acc_o[mt][ot][2 * r], acc_o[mt][ot][2 * r + 1]));
      if (lane % 4 == 0 && first_row + row < seq.len_q) lse[row] = row_lse[mt][r];
    }
  __syncwarp();
  constexpr int kChunks = QTile::kChunks;
#pragma unroll
  for (int it = 0; it < Traits::kRowsPerWarp * kChunks / 32; ++it) {
    const int i = it * 32 + lane;
    const int row = warp_row + i / kChunks, chunk = i % kChunks;
    if (row < valid_rows)
      *reinterpret_cast<uint4*>(out + row * p.out_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + QTile::offset(row, chunk));
  }
}

}  // namespace fat::sm80
