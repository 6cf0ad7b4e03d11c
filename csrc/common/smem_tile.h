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
};

// Copies rows [0, Rows) of a global tile (row stride in elements) into a SmemTile with 16-byte
// cp.async; rows >= valid_rows are zero-filled. All Threads threads of the CTA take part.
// Each pass covers kRowsPerPass rows, a multiple of 8, so a thread's swizzled chunk is the same
// in every pass and all addresses are one base plus a constant stride. Offsets are 32-bit (a
// tile spans far fewer than 2^31 elements). Per-chunk 64-bit addresses would be hoisted out of
// the main loop one register pair each, and spill.
template <typename Tile, int Threads, typename Element>
__device__ __forceinline__ void load_tile_async(Element* smem, const Element* gmem,
                                                int64_t row_stride, int valid_rows) {
  constexpr int kTotal = Tile::kRows * Tile::kChunks;
  constexpr int kRowsPerPass = Threads / Tile::kChunks;
  static_assert(kTotal % Threads == 0 && Threads % Tile::kChunks == 0 && kRowsPerPass % 8 == 0,
                "tile chunks must divide evenly among the threads, 8 rows at a time");
  const int row0 = threadIdx.x / Tile::kChunks, chunk = threadIdx.x % Tile::kChunks;
  const int stride = static_cast<int>(row_stride);
  const uint32_t dst = smem_addr(smem) + 2 * Tile::offset(row0, chunk);
  const Element* src = gmem + row0 * stride + chunk * 8;
#pragma unroll
  for (int it = 0; it < kTotal / Threads; ++it) {
    const bool valid = row0 + it * kRowsPerPass < valid_rows;
    cp_async_16(dst + it * kRowsPerPass * Tile::kCols * 2, valid ? src + it * kRowsPerPass * stride : gmem,
                valid);
  }
}

// Lane-dependent shared-memory addresses for the fragments of mma.m16n8k16.
//
// The swizzle is an XOR on the chunk bits of a byte offset, and a fragment block at (row0, col0)
// -- row0 a multiple of 8, col0 of 16 elements (8 for pair stores) -- moves the row bits by an
// addition that leaves the chunk bits alone and the chunk bits by an XOR. So every address is
//   (lane address ^ col0 * 2) + row0 * row bytes:
// one register per tile and kind, a LOP3 with an immediate, and an offset folded into the load.
// (Computing each block's swizzled offset afresh makes ptxas keep one register per block.)
// Tile bases must be aligned to a row (128 or 256 bytes) so the XOR never reaches them.
//
// Kinds (stored row r, 16-byte chunk c of the rows ldmatrix reads):
//   a:    r = lane % 16,              c = lane / 16        A from a [m][k] store; B via .trans
//                                                           from a [k][n] store (V, dO, Q, K)
//   b:    r = lane % 8 + 8 (lane / 16), c = (lane / 8) % 2  B from a [n][k] store (K, V rows);
//                                                           A via .trans from a [k][m] store
//   pair: r = lane / 4, byte 4 (lane % 4) of chunk 0      an accumulator's pair of values
template <typename Tile>
struct Frag {
  static constexpr int kRowBytes = Tile::kCols * 2;
  __device__ __forceinline__ static uint32_t lane_a(uint32_t base, int lane) {
    return base + 2 * Tile::offset(lane & 15, lane >> 4);
  }
  __device__ __forceinline__ static uint32_t lane_b(uint32_t base, int lane) {
    return base + 2 * Tile::offset((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  }
  __device__ __forceinline__ static uint32_t lane_pair(uint32_t base, int lane) {
    return base + 2 * Tile::offset(lane >> 2, 0) + 4 * (lane & 3);
  }
  __device__ __forceinline__ static uint32_t at(uint32_t lane_addr, int row0, int col0) {
    return (lane_addr ^ (col0 * 2)) + row0 * kRowBytes;
  }
};

}  // namespace fat
