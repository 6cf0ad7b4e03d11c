// sm80 backward. Grid: (key blocks or dq splits, kv heads, batch). A CTA keeps one block of
// keys with its K, V and dK, dV accumulators, and walks every query block of every q head of its
// kv group (GQA gradients are summed here, never expanded): recompute P from lse, then
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dK += dS^T Q,  dQ += dS K (added into fp32
// dq_accum: per-thread vector reductions on sm80, bulk-copy-engine reductions of whole rows on sm90).
#pragma once
#include <cmath>

#include "../common/mask.h"
#include "../common/ptx.h"
#include "../common/seq_info.h"
#include "../common/smem_tile.h"
#include "../params.h"

namespace fat::sm80 {

// D = rowsum(dO * O), fp32, stored like lse. Each group of HeadDim / 8 lanes handles one row.
template <typename Element, int HeadDim>
__global__ void __launch_bounds__(128) dsum_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kLanesPerRow = HeadDim / 8, kRowsPerBlock = 128 / kLanesPerRow;
  const int head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kLanesPerRow;
  const int col = (threadIdx.x % kLanesPerRow) * 8;
  float sum = 0.f;
  if (row < seq.len_q) {
    const Element* dout = static_cast<const Element*>(p.dout) +
                          seq.q_offset(p.dout_batch_stride, p.dout_row_stride) +
                          head * p.dout_head_stride + row * p.dout_row_stride + col;
    const Element* out = static_cast<const Element*>(p.out) +
                         seq.q_offset(p.out_batch_stride, p.out_row_stride) +
                         head * p.out_head_stride + row * p.out_row_stride + col;
    const uint4 a = *reinterpret_cast<const uint4*>(dout);
    const uint4 b = *reinterpret_cast<const uint4*>(out);
    const Element* ea = reinterpret_cast<const Element*>(&a);
    const Element* eb = reinterpret_cast<const Element*>(&b);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      sum += ElementOps<Element>::to_float(ea[i]) * ElementOps<Element>::to_float(eb[i]);
  }
#pragma unroll
  for (int w = kLanesPerRow / 2; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
  if (row < seq.len_q && threadIdx.x % kLanesPerRow == 0) p.dsum[seq.lse_offset(p, head) + row] = sum;
  // The main kernel adds dQ into dq_accum: clear this row's slice of every split first.
  if (row < seq.len_q) {
    float* acc = p.dq_accum + seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride) +
                 head * p.dq_accum_head_stride + row * p.dq_accum_row_stride + col;
    for (int split = 0; split < p.num_splits; ++split, acc += p.dq_accum_split_stride) {
      reinterpret_cast<float4*>(acc)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      reinterpret_cast<float4*>(acc)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

// dq = (sum of the dq_accum splits) * softmax_scale, in the element type; 8 elements a thread.
template <typename Element, int HeadDim>
__global__ void __launch_bounds__(128) dq_convert_kernel(const __grid_constant__ BwdParams p, Element* dq,
                                                         int64_t dq_batch_stride, int64_t dq_row_stride,
                                                         int64_t dq_head_stride) {
  constexpr int kLanesPerRow = HeadDim / 8, kRowsPerBlock = 128 / kLanesPerRow;
  const int head = blockIdx.y;
  const SeqInfo seq(p, blockIdx.z);
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kLanesPerRow;
  const int col = (threadIdx.x % kLanesPerRow) * 8;
  if (row >= seq.len_q) return;
  const float* acc = p.dq_accum + seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride) +
                     head * p.dq_accum_head_stride + row * p.dq_accum_row_stride + dq_accum_col(row, col);
  float sum[8] = {};
  for (int split = 0; split < p.num_splits; ++split, acc += p.dq_accum_split_stride) {
    const float4 a = reinterpret_cast<const float4*>(acc)[0], b = reinterpret_cast<const float4*>(acc)[1];
    sum[0] += a.x, sum[1] += a.y, sum[2] += a.z, sum[3] += a.w;
    sum[4] += b.x, sum[5] += b.y, sum[6] += b.z, sum[7] += b.w;
  }
  uint4 packed;
  uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    words[i] = ElementOps<Element>::pack(sum[2 * i] * p.softmax_scale, sum[2 * i + 1] * p.softmax_scale);
  *reinterpret_cast<uint4*>(dq + seq.q_offset(dq_batch_stride, dq_row_stride) + head * dq_head_stride +
                            row * dq_row_stride + col) = packed;
}

// Shared-memory carve-up. Stages are addressed by arithmetic, not by indexing a pointer array:
// a run-time index into an array would put the array in local memory.
template <typename Traits>
struct BwdSmem {
  using Element = typename Traits::Element;
  static constexpr int kQ = Traits::QTile::kElements, kKV = Traits::KVTile::kElements;
  Element* base;
  __device__ __forceinline__ explicit BwdSmem(char* raw) : base(reinterpret_cast<Element*>(raw)) {}
  __device__ __forceinline__ Element* k() const { return base; }
  __device__ __forceinline__ Element* v() const { return base + kKV; }
  __device__ __forceinline__ Element* q(int stage) const { return base + 2 * kKV + stage * kQ; }
  __device__ __forceinline__ Element* dout(int stage) const { return base + 2 * kKV + (2 + stage) * kQ; }
  __device__ __forceinline__ Element* p() const { return base + 2 * kKV + 4 * kQ; }
  __device__ __forceinline__ Element* ds() const { return p() + Traits::PTile::kElements; }
  // Per-row lse and D of the Q / dO stages: stage s at lse_rows() + 2 s * kBlockM, D after it.
  __device__ __forceinline__ float* lse_rows(int stage) const {
    return reinterpret_cast<float*>(ds() + Traits::PTile::kElements) + 2 * stage * Traits::kBlockM;
  }
  __device__ __forceinline__ float* dsum_rows(int stage) const { return lse_rows(stage) + Traits::kBlockM; }
  // sm90 only: the fp32 dQ block, laid out like its rows in dq_accum.
  __device__ __forceinline__ float* dq() const { return lse_rows(0) + 4 * Traits::kBlockM; }
};

// Whether this compilation pass adds dQ with the bulk copy engine (sm90) or with per-thread
// vector reductions (sm80).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kBulkDq = true;
#else
constexpr bool kBulkDq = false;
#endif

// One key block: everything between loading K, V and writing dK, dV.
template <typename Traits, typename Mask>
__device__ __forceinline__ void bwd_key_block(const BwdParams& p, const SeqInfo& seq, int head_k,
                                              int n_block, float* dq_accum, const BwdSmem<Traits>& sm) {
  using Element = typename Traits::Element;
  using Ops = ElementOps<Element>;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  using PTile = typename Traits::PTile;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kThreads = Traits::kThreads;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kSM = Traits::kSdpMTiles, kSN = Traits::kSdpNTiles;
  constexpr int kKM = Traits::kKvMTiles, kKN = Traits::kKvNTiles;
  constexpr int kQM = Traits::kDqMTiles, kQN = Traits::kDqNTiles;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // First row / key / head-dim column of this warp's tile in each of the three layouts.
  const int sdp_row = (warp % Traits::kSdpWarpsM) * kSM * 16, sdp_key = (warp / Traits::kSdpWarpsM) * kSN * 8;
  const int kv_key = (warp % Traits::kKvWarpsN) * kKM * 16, kv_col = (warp / Traits::kKvWarpsN) * kKN * 8;
  const int dq_row = (warp % Traits::kDqWarpsM) * kQM * 16, dq_col = (warp / Traits::kDqWarpsM) * kQN * 8;

  const Mask mask(seq, p);
  const int first_key = n_block * kBlockN;
  const int valid_keys = min(kBlockN, seq.len_k - first_key);
  const int group = p.heads / p.heads_k;

  const int m_begin = mask.m_begin(first_key, kBlockM);
  const int m_count =
      max(0, mask.m_end(first_key + kBlockN - 1, kBlockM, ceil_div(seq.len_q, kBlockM)) - m_begin);
  const int steps = group * m_count;

  float acc_dk[kKM][kKN][4], acc_dv[kKM][kKN][4];
#pragma unroll
  for (int mt = 0; mt < kKM; ++mt)
#pragma unroll
    for (int nt = 0; nt < kKN; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_dk[mt][nt][i] = acc_dv[mt][nt][i] = 0.f;

  const Element* q_seq = static_cast<const Element*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride);
  const Element* do_seq =
      static_cast<const Element*>(p.dout) + seq.q_offset(p.dout_batch_stride, p.dout_row_stride);
  // Starts the loads of the Q and dO tiles (and lse, D) of (head, query block m) into `stage`.
  auto load_q_do = [&](int head, int m, int stage) {
    const int first_row = m * kBlockM;
    const int rows = seq.len_q - first_row;
    load_tile_async<QTile, kThreads>(sm.q(stage), q_seq + head * p.q_head_stride + first_row * p.q_row_stride,
                                     p.q_row_stride, rows);
    load_tile_async<QTile, kThreads>(sm.dout(stage),
                                     do_seq + head * p.dout_head_stride + first_row * p.dout_row_stride,
                                     p.dout_row_stride, rows);
    // Rows past the end are zero-filled (Q = dO = 0, so dP = D = 0 and dS = 0); the P loop gives
    // them lse = +inf, so P = 0 too (with ALiBi a zero Q row's P would be exp2(bias), which may
    // overflow: inf x 0 = NaN in P^T dO).
    static_assert(kBlockM <= kThreads, "one thread per row of lse / D");
    if (threadIdx.x < kBlockM) {
      const int64_t offset = seq.lse_offset(p, head) + first_row + threadIdx.x;
      const bool valid = static_cast<int>(threadIdx.x) < rows;
      cp_async_4(smem_addr(sm.lse_rows(stage) + threadIdx.x), p.lse + (valid ? offset : 0), valid);
      cp_async_4(smem_addr(sm.dsum_rows(stage) + threadIdx.x), p.dsum + (valid ? offset : 0), valid);
    }
  };

  if (steps > 0) {
    const Element* k = static_cast<const Element*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride) +
                       head_k * p.k_head_stride + first_key * p.k_row_stride;
    const Element* v = static_cast<const Element*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride) +
                       head_k * p.v_head_stride + first_key * p.v_row_stride;
    load_tile_async<KVTile, kThreads>(sm.k(), k, p.k_row_stride, valid_keys);
    load_tile_async<KVTile, kThreads>(sm.v(), v, p.v_row_stride, valid_keys);
    load_q_do(head_k * group, m_begin, 0);
    cp_async_commit();
  }
  const uint32_t k_a = Frag<KVTile>::lane_a(smem_addr(sm.k()), lane), k_b = Frag<KVTile>::lane_b(smem_addr(sm.k()), lane);
  const uint32_t v_b = Frag<KVTile>::lane_b(smem_addr(sm.v()), lane);
  const uint32_t p_b = Frag<PTile>::lane_b(smem_addr(sm.p()), lane), ds_b = Frag<PTile>::lane_b(smem_addr(sm.ds()), lane);
  const uint32_t ds_a = Frag<PTile>::lane_a(smem_addr(sm.ds()), lane);
  const uint32_t p_pair = Frag<PTile>::lane_pair(smem_addr(sm.p()), lane);
  constexpr uint32_t kDsFromP = PTile::kBytes;  // dS sits right after P

  // Steps walk (head, query block) pairs, query blocks fastest. Counters, not step / m_count:
  // the division and its spilled operands cost ~9% of the kernel's stall samples (ncu).
  const int m_end = m_begin + m_count;
  int head = head_k * group, m = m_begin;
  // sm90: the dQ block staged by the previous step, added to dq_accum once a barrier has passed,
  // by thread 0 in one bulk reduction of its valid rows (contiguous in dq_accum). One large copy,
  // not one per row: 64-128 row copies issued by a few warps held the others at the next barrier.
  float* pending_dq = nullptr;
  int pending_dq_rows = 0;
  auto issue_dq = [&]() {
    if (pending_dq != nullptr && threadIdx.x == 0) {
      bulk_reduce_add_f32(pending_dq, smem_addr(sm.dq()), pending_dq_rows * kHeadDim * 4);
      bulk_commit();
    }
    pending_dq = nullptr;
  };
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    const int first_row = m * kBlockM;
    int next_head = head, next_m = m + 1;
    if (next_m == m_end) next_m = m_begin, ++next_head;
    cp_async_wait<0>();
    __syncthreads();  // this step's Q, dO visible; every warp done with the last step's smem
    if (step + 1 < steps) {
      load_q_do(next_head, next_m, stage ^ 1);
      cp_async_commit();
    }
    if constexpr (kBulkDq) issue_dq();
    const uint32_t q_a = Frag<QTile>::lane_a(smem_addr(sm.q(stage)), lane);
    const uint32_t do_a = Frag<QTile>::lane_a(smem_addr(sm.dout(stage)), lane);

    // ---- dropout's keep bits: one Philox draw per row and 32-key group covers kTilesPerDraw of
    // the warp's column tiles (its keys start at a multiple of 8 kTilesPerDraw, so no tile
    // straddles two draws). Drawn before the GEMMs, while the S and dP accumulators are not live.
    constexpr int kTilesPerDraw = kSN < 4 ? kSN : 4;
    static_assert(kSN % kTilesPerDraw == 0 && 4 % kTilesPerDraw == 0, "column tiles per draw");
    uint32_t keep[kSM][2][kSN / kTilesPerDraw];
    if constexpr (Mask::kDropout)
#pragma unroll
      for (int mt = 0; mt < kSM; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int d = 0; d < kSN / kTilesPerDraw; ++d)
            keep[mt][r][d] = mask.dropout_bits(seq.batch * p.heads + head,
                                               first_row + sdp_row + mt * 16 + lane / 4 + 8 * r,
                                               (first_key + sdp_key + d * kTilesPerDraw * 8) / 32);

    // ---- S = Q K^T and dP = dO V^T
    float s[kSM][kSN][4], dp[kSM][kSN][4];
#pragma unroll
    for (int mt = 0; mt < kSM; ++mt)
#pragma unroll
      for (int nt = 0; nt < kSN; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nt][i] = dp[mt][nt][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim; kk += 16) {
      uint32_t aq[kSM][4], ado[kSM][4];
#pragma unroll
      for (int mt = 0; mt < kSM; ++mt) {
        ldmatrix_x4(aq[mt], Frag<QTile>::at(q_a, sdp_row + mt * 16, kk));
        ldmatrix_x4(ado[mt], Frag<QTile>::at(do_a, sdp_row + mt * 16, kk));
      }
#pragma unroll
      for (int np = 0; np < kSN / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, Frag<KVTile>::at(k_b, sdp_key + np * 16, kk));
#pragma unroll
        for (int mt = 0; mt < kSM; ++mt) {
          Ops::mma(s[mt][2 * np], aq[mt], b[0], b[1]);
          Ops::mma(s[mt][2 * np + 1], aq[mt], b[2], b[3]);
        }
        ldmatrix_x4(b, Frag<KVTile>::at(v_b, sdp_key + np * 16, kk));
#pragma unroll
        for (int mt = 0; mt < kSM; ++mt) {
          Ops::mma(dp[mt][2 * np], ado[mt], b[0], b[1]);
          Ops::mma(dp[mt][2 * np + 1], ado[mt], b[2], b[3]);
        }
      }
    }

    // ---- P = exp2(S * scale_log2 - lse * log2 e), dS = P (dP - D), both to shared memory.
    const bool needs_mask = mask.block_needs_mask(first_row, kBlockM, first_key, kBlockN);
    const float alibi_coef = mask.alibi_coef(head);
#pragma unroll
    for (int mt = 0; mt < kSM; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = sdp_row + mt * 16 + lane / 4 + 8 * r;
        const float lse_log2 = first_row + row < seq.len_q ? sm.lse_rows(stage)[row] * 1.4426950409f : INFINITY;
        const float dsum = sm.dsum_rows(stage)[row];
        const int col_limit = mask.key_end(first_row + row) - first_key;
        const int col_first = mask.key_begin(first_row + row) - first_key;
        // ALiBi: this row's position and the lane's first key as floats (Variant::alibi_bias)
        const float alibi_position = static_cast<float>(first_row + row + mask.shift);
        const float alibi_key = static_cast<float>(first_key + sdp_key + 2 * (lane % 4));
#pragma unroll
        for (int nt = 0; nt < kSN; ++nt) {
          float pr[2], dsr[2];
          const int col = sdp_key + nt * 8 + 2 * (lane % 4);
          // the tile's keep bits: 2 t of its draw, t its index among the group's four tiles
          [[maybe_unused]] const uint32_t keep_pair =
              Mask::kDropout ? keep[mt][r][nt / kTilesPerDraw] >> (2 * ((sdp_key + nt * 8) / 8 % 4)) : 0u;
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float score = mask.score(s[mt][nt][2 * r + c]);
            const float biased = Mask::kAlibi ? mask.alibi_bias(score, alibi_coef, alibi_position,
                                                                 alibi_key + static_cast<float>(nt * 8 + c))
                                              : score;
            float pv = fast_exp2(fmaf(biased, p.scale_log2, -lse_log2));
            if (needs_mask && (col + c >= col_limit || (Mask::kLocal && col + c < col_first))) pv = 0.f;
            if constexpr (Mask::kDropout) {
              // dV takes the kept P (scaled once at the end), dS the gradient through the kept
              // ones: P (Z dP / p_keep - D), D from the dropped output
              const bool kept = (keep_pair >> c) & 1u;
              pr[c] = kept ? pv : 0.f;
              dsr[c] = pv * ((kept ? dp[mt][nt][2 * r + c] * mask.dropout_scale : 0.f) - dsum) *
                       mask.score_grad(score);
            } else {
              pr[c] = pv;
              dsr[c] = pv * (dp[mt][nt][2 * r + c] - dsum) * mask.score_grad(score);
            }
          }
          const uint32_t addr = Frag<PTile>::at(p_pair, sdp_row + mt * 16 + 8 * r, sdp_key + nt * 8);
          st_shared_u32(addr, Ops::pack(pr[0], pr[1]));
          st_shared_u32(addr + kDsFromP, Ops::pack(dsr[0], dsr[1]));
        }
      }
    // The bulk engine must be done reading the staged dQ block before this step restages it.
    // (Deterministic mode needs no more: a CTA adds to a dq_accum row once per key block, and
    // waits for full completion at the end of each key block.)
    if (kBulkDq && threadIdx.x == 0) bulk_wait_read();
    __syncthreads();  // P and dS complete in shared memory; the staged dQ block is free again

    // ---- dV += P^T dO and dK += dS^T Q
#pragma unroll
    for (int kq = 0; kq < kBlockM; kq += 16) {
      uint32_t ap[kKM][4], ads[kKM][4];
#pragma unroll
      for (int mt = 0; mt < kKM; ++mt) {
        ldmatrix_x4_trans(ap[mt], Frag<PTile>::at(p_b, kq, kv_key + mt * 16));
        ldmatrix_x4_trans(ads[mt], Frag<PTile>::at(ds_b, kq, kv_key + mt * 16));
      }
#pragma unroll
      for (int np = 0; np < kKN / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, Frag<QTile>::at(do_a, kq, kv_col + np * 16));
#pragma unroll
        for (int mt = 0; mt < kKM; ++mt) {
          Ops::mma(acc_dv[mt][2 * np], ap[mt], b[0], b[1]);
          Ops::mma(acc_dv[mt][2 * np + 1], ap[mt], b[2], b[3]);
        }
        ldmatrix_x4_trans(b, Frag<QTile>::at(q_a, kq, kv_col + np * 16));
#pragma unroll
        for (int mt = 0; mt < kKM; ++mt) {
          Ops::mma(acc_dk[mt][2 * np], ads[mt], b[0], b[1]);
          Ops::mma(acc_dk[mt][2 * np + 1], ads[mt], b[2], b[3]);
        }
      }
    }

    // ---- dQ += dS K, added into fp32 dq_accum
    float dq[kQM][kQN][4];
#pragma unroll
    for (int mt = 0; mt < kQM; ++mt)
#pragma unroll
      for (int nt = 0; nt < kQN; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) dq[mt][nt][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBlockN; kk += 16) {
      uint32_t a[kQM][4];
#pragma unroll
      for (int mt = 0; mt < kQM; ++mt) ldmatrix_x4(a[mt], Frag<PTile>::at(ds_a, dq_row + mt * 16, kk));
#pragma unroll
      for (int np = 0; np < kQN / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, Frag<KVTile>::at(k_a, kk, dq_col + np * 16));
#pragma unroll
        for (int mt = 0; mt < kQM; ++mt) {
          Ops::mma(dq[mt][2 * np], a[mt], b[0], b[1]);
          Ops::mma(dq[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
    float* dq_rows = dq_accum + seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride) +
                     head * p.dq_accum_head_stride + first_row * p.dq_accum_row_stride;
    if constexpr (kBulkDq) {
      // Stage the block; the next barrier publishes it and the bulk engine adds it (issue_dq).
#pragma unroll
      for (int mt = 0; mt < kQM; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = dq_row + mt * 16 + lane / 4 + 8 * r;
          float* dst = sm.dq() + row * kHeadDim;
#pragma unroll
          for (int nt = 0; nt < kQN; ++nt)
            *reinterpret_cast<float2*>(dst + dq_accum_col(row, dq_col + nt * 8 + 2 * (lane % 4))) =
                make_float2(dq[mt][nt][2 * r], dq[mt][nt][2 * r + 1]);
        }
      fence_proxy_async();
      pending_dq = dq_rows;
      pending_dq_rows = min(kBlockM, seq.len_q - first_row);
    } else {
#pragma unroll
      for (int mt = 0; mt < kQM; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = dq_row + mt * 16 + lane / 4 + 8 * r;
          if (first_row + row >= seq.len_q) continue;
          float* dst = dq_rows + row * p.dq_accum_row_stride;
#pragma unroll
          for (int nt = 0; nt < kQN; ++nt)
            atomic_add_pair(dst + dq_accum_col(row, dq_col + nt * 8 + 2 * (lane % 4)), dq[mt][nt][2 * r],
                            dq[mt][nt][2 * r + 1]);
        }
    }
    head = next_head, m = next_m;
  }
  if constexpr (kBulkDq) {
    __syncthreads();  // the last staged dQ block is complete
    issue_dq();
    if (threadIdx.x == 0) bulk_wait_all();  // shared memory is reused or released next
  }

  // ---- dK (scaled by softmax_scale, as S was) and dV; keys no query sees get zeros.
  Element* dk = static_cast<Element*>(p.dk) + seq.k_offset(p.dk_batch_stride, p.dk_row_stride) +
                head_k * p.dk_head_stride + first_key * p.dk_row_stride;
  Element* dv = static_cast<Element*>(p.dv) + seq.k_offset(p.dv_batch_stride, p.dv_row_stride) +
                head_k * p.dv_head_stride + first_key * p.dv_row_stride;
#pragma unroll
  for (int mt = 0; mt < kKM; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = kv_key + mt * 16 + lane / 4 + 8 * r;
      if (key >= valid_keys) continue;
#pragma unroll
      for (int nt = 0; nt < kKN; ++nt) {
        const int col = kv_col + nt * 8 + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(dk + key * p.dk_row_stride + col) =
            Ops::pack(acc_dk[mt][nt][2 * r] * p.softmax_scale, acc_dk[mt][nt][2 * r + 1] * p.softmax_scale);
        const float dv_scale = Mask::kDropout ? mask.dropout_scale : 1.f;  // the kept P, unscaled until here
        *reinterpret_cast<uint32_t*>(dv + key * p.dv_row_stride + col) =
            Ops::pack(acc_dv[mt][nt][2 * r] * dv_scale, acc_dv[mt][nt][2 * r + 1] * dv_scale);
      }
    }
  __syncthreads();  // the next key block of this CTA reuses the shared memory
}

template <typename Traits, typename Mask>
__global__ void __launch_bounds__(Traits::kThreads, 1) bwd_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(1024) char smem[];
  const BwdSmem<Traits> sm(smem);
  const SeqInfo seq(p, blockIdx.z);
  const int num_blocks = ceil_div(seq.len_k, Traits::kBlockN);
  float* dq_accum = p.dq_accum + (p.deterministic ? blockIdx.x * p.dq_accum_split_stride : 0);
  for (int n = blockIdx.x; n < num_blocks; n += gridDim.x)
    bwd_key_block<Traits, Mask>(p, seq, blockIdx.y, n, dq_accum, sm);
}

}  // namespace fat::sm80
