// The attention variant's mask, in one place: which keys a query row sees, which key (query)
// blocks a query (key) block visits, and which visited blocks need element masks. Today a row
// sees the keys before its sequence's end and, under causal, those left of the bottom-right
// aligned diagonal (query i sees keys j <= i + len_k - len_q). Every kernel asks this type.
#pragma once
#include <cmath>

#include "seq_info.h"

namespace fat {

template <bool Causal>
struct KeyMask {
  static constexpr bool kCausal = Causal;
  int len_k, shift;  // shift: len_k - len_q, the diagonal's offset

  __device__ __forceinline__ explicit KeyMask(const SeqInfo& seq) : len_k(seq.len_k), shift(seq.causal_shift()) {}

  // One past the last key query row `row` sees.
  __device__ __forceinline__ int key_end(int row) const { return Causal ? min(len_k, row + shift + 1) : len_k; }
  __device__ __forceinline__ bool masked(int row, int key) const {
    return key >= len_k || (Causal && key > row + shift);
  }

  // Forward: the key blocks [0, n_end) of block_n keys that rows [first_row, first_row + rows) see.
  __device__ __forceinline__ int n_end(int first_row, int rows, int block_n) const {
    const int n = ceil_div(len_k, block_n);
    return Causal ? min(n, max(0, ceil_div(first_row + rows + shift, block_n))) : n;
  }
  // Backward: the first query block (of block_m rows) with a row that sees key first_key.
  __device__ __forceinline__ int m_begin(int first_key, int block_m) const {
    return Causal ? max(0, first_key - shift) / block_m : 0;
  }
  // Whether keys [first_key, first_key + keys) hold a masked one for a row >= first_row: the
  // blocks that need element masks (the others skip the per-element test).
  __device__ __forceinline__ bool block_needs_mask(int first_row, int first_key, int keys) const {
    return first_key + keys > len_k || (Causal && first_key + keys - 1 > first_row + shift);
  }
};

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
      const int col_limit = mask.key_end(first_row + mt * 16 + lane / 4 + 8 * r);
#pragma unroll
      for (int nt = 0; nt < NTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (first_col + nt * 8 + 2 * (lane % 4) + c >= col_limit) s[mt][nt][2 * r + c] = -INFINITY;
    }
}

}  // namespace fat
