// Shared-memory tiles of 16-bit elements, rows of Cols elements, stored with an XOR swizzle on
// the 16-byte chunks of a row (chunk ^ row % 8). ldmatrix reads 8 rows of one chunk column at a
// time; without the swizzle those 8 rows sit in the same 4 banks and serialise 8-way.
#pragma once
#include <cstdint>

#include "ptx.h"

namespace fat {

template <int Rows_, int Cols_>
struct SmemTile {
  static constexpr int kRows = Rows_;
  static constexpr int kCols = Cols_;
  static constexpr int kChunks = Cols_ / 8;  // 16-byte chunks per row
  static constexpr int kElements = Rows_ * Cols_;
  static constexpr int kBytes = kElements * 2;
  static_assert(kChunks >= 8 && kChunks % 8 == 0, "the swizzle needs rows of 64, 128, ... elements");

  // Element offset of (row, 16-byte chunk).
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * kCols + ((chunk ^ (row & 7)) << 3);
  }
  // Byte offset of element (row, col), col even: where a thread stores a pair of values.
  __device__ __forceinline__ static int pair_byte_offset(int row, int col) {
    return 2 * (offset(row, col >> 3) + (col & 7));
  }
};

// Copies rows [0, Rows) of a global tile (row stride in elements) into a SmemTile with 16-byte
// cp.async; rows >= valid_rows are zero-filled. All Threads threads of the CTA take part.
// Offsets inside a tile are 32-bit (a tile spans far fewer than 2^31 elements): 64-bit ones
// would be hoisted out of the main loop one register pair per chunk and spill.
template <typename Tile, int Threads, typename Element>
__device__ __forceinline__ void load_tile_async(Element* smem, const Element* gmem,
                                                int64_t row_stride, int valid_rows) {
  constexpr int kTotal = Tile::kRows * Tile::kChunks;
  constexpr int kRowsPerPass = Threads / Tile::kChunks;
  static_assert(kTotal % Threads == 0 && Threads % Tile::kChunks == 0,
                "tile chunks must divide evenly among the threads");
  const int row0 = threadIdx.x / Tile::kChunks, chunk = threadIdx.x % Tile::kChunks;
  const int stride = static_cast<int>(row_stride);
  const uint32_t base = smem_addr(smem);
#pragma unroll
  for (int it = 0; it < kTotal / Threads; ++it) {
    const int row = row0 + it * kRowsPerPass;
    const bool valid = row < valid_rows;
    cp_async_16(base + 2 * Tile::offset(row, chunk), gmem + (valid ? row * stride + chunk * 8 : 0), valid);
  }
}

// Lane-dependent ldmatrix addresses (byte offsets into a tile), for the fragments of
// mma.m16n8k16. Every fragment row starts at a multiple of 8, so the swizzle term row % 8 is
// lane % 8 and the whole address folds to base + a compile-time offset.
//
// A operand (16 rows x 16 k), stored row-major [row][k]:     a_frag_offset(row0, k0)
// B operand pair (16 n x 16 k), stored [n][k] (e.g. K rows):  b_frag_offset(n0, k0)
// B operand pair (16 k x 16 n), stored [k][n], via .trans:     bt_frag_offset(k0, n0)
// A operand from a [k][m] store via .trans (P^T, dS^T):      at_frag_offset(m0, k0)
template <typename Tile>
struct Frag {
  __device__ __forceinline__ static int a(int row0, int k0, int lane) {
    return 2 * Tile::offset(row0 + (lane & 15), (k0 >> 3) + (lane >> 4));
  }
  __device__ __forceinline__ static int b(int n0, int k0, int lane) {
    return 2 * Tile::offset(n0 + (lane & 7) + ((lane >> 4) << 3), (k0 >> 3) + ((lane >> 3) & 1));
  }
  __device__ __forceinline__ static int bt(int k0, int n0, int lane) {
    return 2 * Tile::offset(k0 + (lane & 15), (n0 >> 3) + (lane >> 4));
  }
  __device__ __forceinline__ static int at(int m0, int k0, int lane) {
    return 2 * Tile::offset(k0 + (lane & 7) + ((lane >> 4) << 3), (m0 >> 3) + ((lane >> 3) & 1));
  }
};

}  // namespace fat
