// The attention variant's mask, in one place: which keys a query row sees, which key (query)
// blocks a query (key) block visits, and which visited blocks need element masks. A row i sits at
// key position i + shift (shift = len_k - len_q: bottom-right alignment) and sees the keys before
// its sequence's end and, under causal, none right of its position; a local (sliding-window)
// mask keeps keys [position - left, position + right] (flash_attn's window_size; a causal window
// is Local with right = 0). Every kernel asks this type.
#pragma once
#include <cmath>

#include "../params.h"
#include "philox.h"
#include "ptx.h"
#include "seq_info.h"
#include "switch.h"

namespace fat {

template <bool Causal, bool Local = false>
struct KeyMask {
  static_assert(!(Causal && Local), "a causal window is a Local mask with right = 0");
  static constexpr bool kCausal = Causal, kLocal = Local;
  static constexpr int kUnbounded = 1 << 28;  // a window edge of -1: farther than any sequence
  int len_k, shift;  // shift: len_k - len_q, the diagonal's offset
  int left, right;   // Local: the window's edges

  __device__ __forceinline__ KeyMask(const SeqInfo& seq, const FwdParams& p)
      : len_k(seq.len_k),
        shift(seq.causal_shift()),
        left(Local && p.window_left >= 0 ? p.window_left : kUnbounded),
        right(Local && p.window_right >= 0 ? p.window_right : kUnbounded) {}

  // The keys [key_begin(row), key_end(row)) query row `row` sees.
  __device__ __forceinline__ int key_begin(int row) const { return Local ? max(0, row + shift - left) : 0; }
  __device__ __forceinline__ int key_end(int row) const {
    return Causal ? min(len_k, row + shift + 1) : Local ? min(len_k, row + shift + right + 1) : len_k;
  }
  __device__ __forceinline__ bool masked(int row, int key) const {
    return key >= len_k || (Causal && key > row + shift) ||
           (Local && (key > row + shift + right || key < row + shift - left));
  }

  // Forward: the key blocks [n_begin, n_end) of block_n keys that rows [first_row, first_row + rows) see.
  __device__ __forceinline__ int n_begin(int first_row, int block_n) const {
    return Local ? max(0, first_row + shift - left) / block_n : 0;
  }
  __device__ __forceinline__ int n_end(int first_row, int rows, int block_n) const {
    const int n = ceil_div(len_k, block_n);
    if (Causal) return min(n, max(0, ceil_div(first_row + rows + shift, block_n)));
    return Local ? min(n, max(0, ceil_div(first_row + rows + shift + right, block_n))) : n;
  }
  // Backward: the query blocks [m_begin, m_end) (of block_m rows, m_blocks in all) with a row that
  // sees one of the keys [first_key, last_key].
  __device__ __forceinline__ int m_begin(int first_key, int block_m) const {
    if (Causal) return max(0, first_key - shift) / block_m;
    return Local ? max(0, first_key - shift - right) / block_m : 0;
  }
  __device__ __forceinline__ int m_end(int last_key, int block_m, int m_blocks) const {
    if (!Local) return m_blocks;
    const int last_row = last_key - shift + left;  // the last row that sees last_key
    return last_row < 0 ? 0 : min(m_blocks, last_row / block_m + 1);
  }
  // Whether keys [first_key, first_key + keys) hold a masked one for a row of
  // [first_row, first_row + rows): the blocks that need element masks (the others skip the
  // per-element test).
  __device__ __forceinline__ bool block_needs_mask(int first_row, int rows, int first_key, int keys) const {
    const int last_key = first_key + keys - 1, last_row = first_row + rows - 1;
    return last_key >= len_k || (Causal && last_key > first_row + shift) ||
           (Local && (last_key > first_row + shift + right || first_key < last_row + shift - left));
  }
};

// The attention variant every kernel is templated on: a key mask plus the score transform.
// Softcap (Gemma 2): a scaled score x becomes softcap * tanh(x / softcap). The kernels apply it to
// their unscaled q.k accumulators s as t = tanh(s * softmax_scale / softcap) (score()) and run
// the softmax on t with scale_log2 = softcap * log2(e) (set on the host, params.h), so lse comes
// out in the natural units; the backward multiplies dS by dt/dx = 1 - t^2 (score_grad()).
// Alibi: the scaled score gets the bias -slope * |row + shift - key| (flash_attn's ALiBi: the
// distance from the query's position to the key), slope per (batch,) head; under a causal mask
// flash_attn adds slope * key instead (the same softmax, as key <= row + shift; lse differs by
// the row's constant) and so do we, to return its lse. In the kernels' units (s, before
// scale_log2) the slope is -alibi_coef(head) (alibi_bias). A constant per row shifts nothing, so
// the backward's dS is unchanged.
// Dropout (plain scores only, but in the sm80 kernels' Combined variant): the normalised
// probability of (query head bh = batch x heads + head, row, key) is kept with probability p_keep
// by the Philox draw of common/philox.h (its values read from p.rng_state, so a captured CUDA
// graph draws anew on each replay) and scaled by 1 / p_keep; the forward's row sums and lse are
// those of the undropped probabilities.
// Combined (the sm80 kernels): any combination of softcap, ALiBi and dropout in one kernel per
// mask, each compiled in and switched on or off at run time by the call (uniform branches), so
// that rare combinations do not multiply the instantiations; softcap comes first, then the ALiBi
// bias on the capped score (flash_attn's order), then the softmax and dropout. The single
// features keep their own kernels.
template <typename Mask, bool Softcap, bool Alibi = false, bool Dropout = false, bool Combined = false>
struct Variant : Mask {
  static_assert(Combined ? !(Softcap || Alibi || Dropout) : Softcap + Alibi + Dropout <= 1,
                "a combination of features is the Combined variant");
  static constexpr bool kSoftcap = Softcap || Combined, kAlibi = Alibi || Combined, kDropout = Dropout || Combined;
  bool softcap_on, alibi_on, dropout_on;  // Combined: the features this call uses (read through the *_active())
  float softcap_scale;        // softmax_scale / softcap
  const float* alibi_slopes;  // this sequence's slopes, one per query head (natural units)
  float alibi_scale;          // log2(e) / scale_log2: natural units to the kernels' score units
  uint64_t dropout_seed;
  uint32_t dropout_offset, dropout_threshold;
  float dropout_scale;  // 1 / p_keep (1 without dropout)

  __device__ __forceinline__ Variant(const SeqInfo& seq, const FwdParams& p)
      : Mask(seq, p),
        softcap_on(Combined && p.softcap),
        alibi_on(Combined && p.alibi),
        dropout_on(Combined && p.dropout),
        softcap_scale(p.softcap_scale),
        alibi_slopes(Alibi || (Combined && p.alibi) ? p.alibi_slopes + seq.batch * p.alibi_batch_stride : nullptr),
        alibi_scale(p.alibi_scale),
        dropout_seed(Dropout || (Combined && p.dropout) ? static_cast<uint64_t>(p.rng_state[0]) : 0),
        dropout_offset(Dropout || (Combined && p.dropout) ? static_cast<uint32_t>(p.rng_state[1]) : 0),
        dropout_threshold(p.dropout_threshold),
        dropout_scale(p.dropout_scale) {}
  // Whether the call uses each feature: compile-time outside Combined, so the specialised kernels
  // compile exactly as without Combined.
  __device__ __forceinline__ bool softcap_active() const {
    if constexpr (Combined) return softcap_on; else return Softcap;
  }
  __device__ __forceinline__ bool alibi_active() const {
    if constexpr (Combined) return alibi_on; else return Alibi;
  }
  __device__ __forceinline__ bool dropout_active() const {
    if constexpr (Combined) return dropout_on; else return Dropout;
  }
  // The keep bits of the 8 columns a lane of quad `quad` holds of the 32-key group `group` of a
  // row (common/philox.h: bit 2 t + e is column 32 group + 8 t + 2 quad + e); all kept when the
  // call has no dropout. quad defaults to this lane's in the m16n8 layout (lane % 4).
  __device__ __forceinline__ uint32_t dropout_bits(int bh, int row, int group, int quad = threadIdx.x % 4) const {
    if (!dropout_active()) return 0xFFu;
    return dropout_keep_bits(dropout_seed, dropout_offset, static_cast<uint32_t>(bh), static_cast<uint32_t>(row),
                             static_cast<uint32_t>(group), static_cast<uint32_t>(quad), dropout_threshold);
  }
  __device__ __forceinline__ float score(float s) const {
    return softcap_active() ? fast_tanh(s * softcap_scale) : s;
  }
  __device__ __forceinline__ float score_grad(float t) const { return softcap_active() ? 1.f - t * t : 1.f; }
  // -slope of head `head` in score units (0 without ALiBi).
  __device__ __forceinline__ float alibi_coef(int head) const {
    return alibi_active() ? -alibi_slopes[head] * alibi_scale : 0.f;
  }
  // s plus the ALiBi bias of query position `position` (row + shift) and key `key`, both as floats
  // (the callers form them as a per-lane base plus constants: no integer conversion per score).
  __device__ __forceinline__ float alibi_bias(float s, float coef, float position, float key) const {
    return Mask::kCausal ? fmaf(-coef, key, s) : fmaf(coef, fabsf(position - key), s);
  }
};

// A type tag: launchers receive the variant policy as Tag<Variant<...>> from variant_switch.
template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<Variant<KeyMask<...>, Softcap, Alibi>>{}) for the mask p asks for: none, causal, or
// local (flash_attn_api normalises a causal window to local with right = 0).
template <bool Softcap, bool Alibi, bool Dropout = false, bool Combined = false, typename F>
decltype(auto) mask_switch(const FwdParams& p, F&& f) {
  if (p.local) return f(Tag<Variant<KeyMask<false, true>, Softcap, Alibi, Dropout, Combined>>{});
  return bool_switch(p.causal, [&](auto causal) {
    return f(Tag<Variant<KeyMask<causal>, Softcap, Alibi, Dropout, Combined>>{});
  });
}

// The same for the whole variant p asks for: each mask plain, with softcap or with ALiBi (nine
// instantiations).
template <typename F>
decltype(auto) variant_switch(const FwdParams& p, F&& f) {
  if (p.alibi) return mask_switch<false, true>(p, f);
  return bool_switch(p.softcap, [&](auto softcap) { return mask_switch<decltype(softcap)::value, false>(p, f); });
}

// variant_switch plus each mask with dropout (twelve instantiations): the sm90 kernels' switch
// (the sm80 ones add the Combined variant).
template <typename F>
decltype(auto) variant_switch_with_dropout(const FwdParams& p, F&& f) {
  if (p.dropout) return mask_switch<false, false, true>(p, f);
  return variant_switch(p, f);
}

// The sm80 kernels' switch: variant_switch_with_dropout, and each mask's Combined variant for a
// call that combines softcap, ALiBi and dropout (fifteen instantiations).
template <typename F>
decltype(auto) sm80_variant_switch(const FwdParams& p, F&& f) {
  if (combines_features(p)) return mask_switch<false, false, false, true>(p, f);
  return variant_switch_with_dropout(p, f);
}

// A 16-bit lane mask for a packed pair of elements: bits 0 and 1 of keep say whether the low and
// the high element are kept.
__device__ __forceinline__ uint32_t keep_pair_mask(uint32_t keep) {
  return ((keep & 1u) ? 0x0000FFFFu : 0u) | ((keep & 2u) ? 0xFFFF0000u : 0u);
}

// Dropout's keep bits (Variant::dropout_bits) of this lane's two rows of an m16 tile (row0 +
// lane / 4, and 8 more) over Groups 32-key groups from key first_col (a multiple of 32).
template <int Groups, typename Mask>
__device__ __forceinline__ void draw_keep_bits(uint32_t (&keep)[2][Groups], const Mask& mask, int bh, int row0,
                                               int first_col) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int g = 0; g < Groups; ++g)
      keep[r][g] = mask.dropout_bits(bh, row0 + static_cast<int>(threadIdx.x) % 32 / 4 + 8 * r, first_col / 32 + g);
}

// Zeroes the dropped elements of the packed P fragment of k16 slice kk (the m16n8k16 / wgmma
// register-A layout: a[i] holds row half i % 2, column tile 2 kk + i / 2, whose keep bits sit at
// 2 (tile % 4) of its group's draw).
template <int Groups>
__device__ __forceinline__ void drop_a_fragment(uint32_t (&a)[4], int kk, const uint32_t (&keep)[2][Groups]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int tile = 2 * kk + i / 2;
    a[i] &= keep_pair_mask(keep[i % 2][tile / 4] >> (2 * (tile % 4)));
  }
}

// Adds slope x key to every score (m16n8 accumulator layout), key = key_base + the column's offset
// in the lane's tiles: an FFMA per column, then an FADD per score.
template <int MTiles, int NTiles>
__device__ __forceinline__ void add_column_bias(float (&s)[MTiles][NTiles][4], float slope, int key_base) {
  const float bias_base = slope * static_cast<float>(key_base);
#pragma unroll
  for (int nt = 0; nt < NTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float bias = fmaf(slope, static_cast<float>(nt * 8 + c), bias_base);
#pragma unroll
      for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) s[mt][nt][2 * r + c] += bias;
    }
}

// Adds coef |distance - column offset| to the scores of row half r of tile row mt, distance being
// the row's position less the lane's first key: an FADD and an FFMA with |.| per score.
template <int MTiles, int NTiles>
__device__ __forceinline__ void add_distance_bias(float (&s)[MTiles][NTiles][4], int mt, int r, float coef,
                                                  float distance) {
#pragma unroll
  for (int nt = 0; nt < NTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      s[mt][nt][2 * r + c] = fmaf(coef, fabsf(distance - static_cast<float>(nt * 8 + c)), s[mt][nt][2 * r + c]);
}

// Adds the ALiBi bias (Variant::alibi_bias) to every score of a warp's tiles (m16n8 accumulator
// layout, as mask_scores), in the fewest instructions per score: the causal form's bias depends
// on the key only, so each of the lane's columns gets it once and every row adds it (an FADD per
// score, an FFMA per column); the distance form takes position - key as a per-row float base
// less the column's constant offset (an FADD and an FFMA with |.| per score).
template <typename Mask, int MTiles, int NTiles>
__device__ __forceinline__ void add_alibi(float (&s)[MTiles][NTiles][4], const Mask& mask, float coef,
                                          int first_row, int first_col) {
  const int lane = threadIdx.x % 32;
  const int key_base = first_col + 2 * (lane % 4);
  if constexpr (Mask::kCausal) {
    add_column_bias(s, -coef, key_base);
  } else {
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        add_distance_bias(s, mt, r, coef,
                          static_cast<float>(first_row + mt * 16 + lane / 4 + 8 * r + mask.shift - key_base));
      }
  }
}

// The non-causal (distance) ALiBi bias in one FP32 op per score off the diagonal: every row's
// scores are taken shifted by row_shift(row) = -coef (row + shift) (a per-row constant: the
// same softmax; OnlineSoftmax::finalize takes it back out of lse). A key block wholly left of the
// warp's rows then adds -coef key (per column), one wholly right of them +coef key (per column)
// and a per-row -2 coef (row + shift), returned in offset[mt][r] for OnlineSoftmax::exponentiate
// (it joins the row max and the exp2's addend for free); a block across the diagonal adds
// coef |row + shift - key| (two ops per score) with offset -coef (row + shift).
template <typename Mask, int MTiles, int NTiles>
__device__ __forceinline__ void add_alibi_shifted(float (&s)[MTiles][NTiles][4], const Mask& mask, float coef,
                                                  int first_row, int first_col, float (&offset)[MTiles][2]) {
  static_assert(!Mask::kCausal, "the causal form is add_alibi's");
  const int lane = threadIdx.x % 32;
  const int key_base = first_col + 2 * (lane % 4);
  const int first_position = first_row + mask.shift, last_position = first_position + 16 * MTiles - 1;
  const int last_col = first_col + 8 * NTiles - 1;
  const bool left = last_col <= first_position, right = first_col > last_position;  // warp-uniform
  if (left || right) add_column_bias(s, left ? -coef : coef, key_base);
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float position = static_cast<float>(first_position + mt * 16 + lane / 4 + 8 * r);
      offset[mt][r] = left ? 0.f : right ? -2.f * coef * position : -coef * position;
      if (!left && !right) add_distance_bias(s, mt, r, coef, position - static_cast<float>(key_base));
    }
}

// The per-row shift of add_alibi_shifted, times scale_log2 (for OnlineSoftmax::finalize).
template <typename Mask, int MTiles>
__device__ __forceinline__ void alibi_row_shift_log2(float (&shift_log2)[MTiles][2], const Mask& mask, float coef,
                                                     int first_row, float scale_log2) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      shift_log2[mt][r] =
          -coef * static_cast<float>(first_row + mask.shift + mt * 16 + lane / 4 + 8 * r) * scale_log2;
}

// Sets masked scores of a warp's tiles to -inf (m16n8 accumulator layout: a lane holds rows
// lane/4 and lane/4 + 8 of each 16-row tile, columns 2*(lane%4) and +1 of each 8-column tile).
// first_row / first_col: the tiles' first query row / key.
template <typename Mask, int MTiles, int NTiles>
__device__ __forceinline__ void mask_scores(float (&s)[MTiles][NTiles][4], const Mask& mask,
                                            int first_row, int first_col) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = first_row + mt * 16 + lane / 4 + 8 * r;
      const int col_limit = mask.key_end(row), col_first = mask.key_begin(row);
#pragma unroll
      for (int nt = 0; nt < NTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = first_col + nt * 8 + 2 * (lane % 4) + c;
          if (col >= col_limit || (Mask::kLocal && col < col_first)) s[mt][nt][2 * r + c] = -INFINITY;
        }
    }
}

}  // namespace fat
