// Online softmax over the rows of a warp's MMA accumulator tiles (m16n8 layout: a lane holds
// rows lane/4 and lane/4 + 8, columns 2*(lane%4) and +1 of every 8-column tile).
//
// Two forms of the row sum l, chosen at compile time:
//   vector: each lane adds its own exp2 values on the FP32 pipe, one quad reduction at the end;
//   tensor: l is accumulated on the tensor cores as P x ones (an extra m16n8k16 MMA per P.V
//           k-step), so every column of that accumulator holds the full row sum -- no adds, no
//           shuffles -- and it sums exactly the rounded P that multiplies V.
#pragma once
#include <cmath>

#include "ptx.h"

namespace fat {

// PolyExp2Quarters: of every 4 accumulator column tiles, how many take their exp2 from poly_exp2
// (FP32/integer pipes) instead of MUFU, to balance the two units (FA-T's tensor/vector balance,
// one level down: MUFU against the FP32 pipe).
template <int MTiles, bool TensorRowSum, bool LazyRescale = false, int PolyExp2Quarters = 0>
struct OnlineSoftmax {
  static constexpr float kLazyThreshold = 8.f;  // log2 of the largest P a stale max may produce

  float row_max[MTiles][2];  // running max of the raw scores of each of the lane's rows
  float row_sum[MTiles][2];  // vector form: this lane's partial sum
  float sum_acc[MTiles][4];  // tensor form: P x ones accumulator

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[mt][r] = -INFINITY;
        row_sum[mt][r] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) sum_acc[mt][i] = 0.f;
    }
  }

  // Takes a tile of raw scores s: raises the running max, replaces s by
  // P = exp2(s * scale_log2 - max * scale_log2) (one FFMA + EX2 per score), and rescales the
  // output accumulator o and the row sum by exp2((old max - new max) * scale_log2).
  template <int NTiles, int OTiles>
  __device__ __forceinline__ void step(float (&s)[MTiles][NTiles][4], float (&o)[MTiles][OTiles][4],
                                       float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) scale_row(o, mt, r, exponentiate_row<false>(s, mt, r, scale_log2));
  }

  // step in two halves, for kernels whose MMAs may still be accumulating into o (and the tensor
  // row sum) during the first: exponentiate turns s into P and leaves each row's correction
  // factor for rescale, which applies it once those MMAs have finished.
  //
  // LazyRescale: the max used as the exp2 shift is raised only when the tile's max exceeds it by
  // more than 2^kLazyThreshold in exp2 units. Otherwise the stale max stays, P <= 2^8 and the
  // correction is exactly 1; o and l share that shift, so O = o / l and lse are exact in the end.
  template <int NTiles>
  __device__ __forceinline__ void exponentiate(float (&s)[MTiles][NTiles][4], float scale_log2,
                                               float (&correction)[MTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) correction[mt][r] = exponentiate_row<true>(s, mt, r, scale_log2);
  }
  // The same for a tile whose row r's scores are s + offset[mt][r] (raw units): the offset joins
  // the row max and the exp2's FFMA addend, so a per-row term costs nothing per score (the
  // non-causal ALiBi forward's blocks off the diagonal: add_alibi_shifted).
  template <int NTiles>
  __device__ __forceinline__ void exponentiate(float (&s)[MTiles][NTiles][4], float scale_log2,
                                               float (&correction)[MTiles][2], const float (&offset)[MTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        correction[mt][r] = exponentiate_row<true, NTiles, true>(s, mt, r, scale_log2, offset[mt][r]);
  }

  // o (and the tensor row sum) times each row's correction. Skipped when no row of the warp
  // changed its max (warp-uniform, so the skip is a branch, not masks). wait_for_o() runs first
  // on either path: where o is still being written by asynchronous MMAs it waits for them.
  // Placed below this branch, that wait cannot be scheduled above the exp2s of exponentiate
  // (ptxas schedules within a basic block and would issue it as early as it could, stalling the
  // softmax behind the MMAs it is meant to overlap).
  template <int OTiles, typename WaitForO>
  __device__ __forceinline__ void rescale(float (&o)[MTiles][OTiles][4], const float (&correction)[MTiles][2],
                                          WaitForO&& wait_for_o) {
    bool changed = false;
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) changed |= correction[mt][0] != 1.f || correction[mt][1] != 1.f;
    if (!__any_sync(0xffffffffu, changed)) {
      wait_for_o();
      return;
    }
    wait_for_o();
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) scale_row(o, mt, r, correction[mt][r]);
  }

  // Tensor form: adds P x ones for one k16 slice of P (already packed as an MMA A operand).
  template <typename Element>
  __device__ __forceinline__ void accumulate_row_sum(int mt, const uint32_t (&p)[4]) {
    if constexpr (TensorRowSum) {
      constexpr uint32_t ones = ElementOps<Element>::kOnePair;
      ElementOps<Element>::mma(sum_acc[mt], p, ones, ones);
    }
  }

  // Divides o by the row sums and returns each row's log-sum-exp in natural-log units; a row with
  // no visible key gets zeros and lse = +inf. sink_log2 (-inf: none) is a logit in log2 units
  // that joins every row's normaliser and carries no value (attention sinks): the row's total is
  // taken relative to the larger of its max and the sink, so neither can overflow the other, and
  // a row without keys then gets zeros and lse = the sink.
  // row_shift_log2: when the scores were taken as (true score + a per-row constant) -- the
  // non-causal ALiBi forward -- that constant times scale_log2: the sink joins the shifted scores,
  // and the returned lse is the true one.
  template <int OTiles>
  __device__ __forceinline__ void finalize(float (&o)[MTiles][OTiles][4], float scale_log2,
                                           float (&lse)[MTiles][2], float sink_log2 = -INFINITY) {
    const float no_shift[MTiles][2] = {};
    finalize(o, scale_log2, lse, sink_log2, no_shift);
  }
  template <int OTiles>
  __device__ __forceinline__ void finalize(float (&o)[MTiles][OTiles][4], float scale_log2,
                                           float (&lse)[MTiles][2], float sink_log2,
                                           const float (&row_shift_log2)[MTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float l = TensorRowSum ? sum_acc[mt][2 * r] : quad_sum(row_sum[mt][r]);
        const float shift = l > 0.f ? row_max[mt][r] * scale_log2 : -INFINITY;  // the exp2 shift of l
        const float top = fmaxf(shift, sink_log2 + row_shift_log2[mt][r]);
        const float keep = top == -INFINITY ? 0.f : fast_exp2(shift - top);
        const float total =
            l * keep + (top == -INFINITY ? 0.f : fast_exp2(sink_log2 + row_shift_log2[mt][r] - top));
        const float inv = total > 0.f ? keep / total : 0.f;
#pragma unroll
        for (int ot = 0; ot < OTiles; ++ot) {
          o[mt][ot][2 * r] *= inv;
          o[mt][ot][2 * r + 1] *= inv;
        }
        lse[mt][r] = total > 0.f ? (top - row_shift_log2[mt][r] + __log2f(total)) * 0.69314718056f : INFINITY;
      }
    }
  }

 private:
  // Row r of m16 tile mt: its running max raised by the tile's scores (by the lazy rule, if on),
  // its scores replaced by P, the vector row sum updated; returns the factor for what o and the
  // tensor row sum accumulated before. SplitForm (exponentiate, for the sm90 kernel): that factor
  // is exactly 1 when the max did not move, so rescale's vote can skip, and the row max is taken
  // as a tree (+2% at hd64 there). step (the sm80 kernel) multiplies unconditionally and keeps
  // the chained max: the tree measured 1-3% slower there at hd64 (benchmarks/NOTES.md).
  // Offset (HasOffset): the row's scores are s + offset.
  template <bool SplitForm, int NTiles, bool HasOffset = false>
  __device__ __forceinline__ float exponentiate_row(float (&s)[MTiles][NTiles][4], int mt, int r, float scale_log2,
                                                    float offset = 0.f) {
    const float old_max = row_max[mt][r];
    float m = old_max;
    if constexpr (SplitForm) {
      m = fmaxf(m, HasOffset ? tile_row_max(s, mt, r) + offset : tile_row_max(s, mt, r));
    } else {
#pragma unroll
      for (int nt = 0; nt < NTiles; ++nt) m = fmaxf(m, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
    }
    m = quad_max(m);
    // (-inf - -inf is NaN, which compares false: a row with no visible key yet keeps -inf.)
    if constexpr (LazyRescale)
      if ((m - old_max) * scale_log2 <= kLazyThreshold) m = old_max;
    // A row that has seen only masked keys keeps max -inf; shift by 0 so exp2 gives 0s.
    const float shift = m == -INFINITY ? 0.f : m * scale_log2;
    const float correction =
        SplitForm && m == old_max ? 1.f : fast_exp2(old_max * scale_log2 - shift);
    row_max[mt][r] = m;
    // (HasOffset: a row with only masked keys in this tile has tile max -inf + offset = -inf.)
    const float addend = HasOffset ? fmaf(offset, scale_log2, -shift) : -shift;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NTiles; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = s[mt][nt][2 * r + c];
        const float arg = fmaf(x, scale_log2, addend);
        x = nt % 4 < PolyExp2Quarters ? poly_exp2(arg) : fast_exp2(arg);
        if constexpr (!TensorRowSum) sum += x;
      }
    }
    if constexpr (!TensorRowSum) row_sum[mt][r] = row_sum[mt][r] * correction + sum;
    return correction;
  }

  // The max of this lane's scores of row r, as a tree: log2(2 NTiles) dependent FMNMX instead of
  // a chain of 2 NTiles, so the exp2s (which wait for it) start that much sooner.
  template <int NTiles>
  __device__ __forceinline__ static float tile_row_max(const float (&s)[MTiles][NTiles][4], int mt, int r) {
    float part[NTiles];
#pragma unroll
    for (int nt = 0; nt < NTiles; ++nt) part[nt] = fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]);
#pragma unroll
    for (int stride = 1; stride < NTiles; stride *= 2)
#pragma unroll
      for (int nt = 0; nt + stride < NTiles; nt += 2 * stride) part[nt] = fmaxf(part[nt], part[nt + stride]);
    return part[0];
  }

  template <int OTiles>
  __device__ __forceinline__ void scale_row(float (&o)[MTiles][OTiles][4], int mt, int r, float factor) {
#pragma unroll
    for (int ot = 0; ot < OTiles; ++ot) {
      o[mt][ot][2 * r] *= factor;
      o[mt][ot][2 * r + 1] *= factor;
    }
    if constexpr (TensorRowSum) {
      sum_acc[mt][2 * r] *= factor;
      sum_acc[mt][2 * r + 1] *= factor;
    }
  }
};

}  // namespace fat
