// Masking of a warp's score tiles (m16n8 accumulator layout: a lane holds rows lane/4 and
// lane/4 + 8 of each 16-row tile, columns 2*(lane%4) and +1 of each 8-column tile).
#pragma once
#include <cmath>

namespace fat {

// Sets masked scores to -inf: keys past the sequence end, and under causal keys right of the
// (bottom-right aligned) diagonal. first_row / first_col: the tile's first query row / key.
template <bool Causal, int MTiles, int NTiles>
__device__ __forceinline__ void mask_scores(float (&s)[MTiles][NTiles][4], int first_row, int first_col, int len_k,
                                            int shift) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = first_row + mt * 16 + lane / 4 + 8 * r;
      const int col_limit = Causal ? min(len_k, row + shift + 1) : len_k;
#pragma unroll
      for (int nt = 0; nt < NTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (first_col + nt * 8 + 2 * (lane % 4) + c >= col_limit) s[mt][nt][2 * r + c] = -INFINITY;
    }
}

}  // namespace fat
