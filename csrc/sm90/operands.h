// wgmma descriptors of the tiles the sm90 kernels keep in shared memory. A tile of R rows is
// stored the way TMA writes it with 128-byte swizzle: per 64-column slab (one swizzle atom wide)
// its R rows at 128 bytes each, slabs one after the other, every tile 1024-byte aligned.
#pragma once
#include "../common/ptx.h"
#include "../common/sm90_ptx.h"

namespace fat::sm90 {

constexpr uint32_t kSlabRowBytes = 128;

// Rows [row0, row0 + 64) (an A operand) or all rows (a B operand) of a tile, columns
// [16 kk, 16 kk + 16) as the K dimension: K-major, 8-row groups 1024 bytes apart; a k16 step is
// 32 bytes inside a slab.
__device__ __forceinline__ uint64_t kmajor_desc(const void* tile, int tile_rows, int row0, int kk) {
  return SmemDesc(smem_addr(tile), 16, 1024, true)
      .at((kk / 4) * tile_rows * kSlabRowBytes + row0 * kSlabRowBytes + (kk % 4) * 32);
}

// Rows [16 kk, 16 kk + 16) of a tile as the K dimension and its columns as M or N: MN-major
// (a transposed operand), the next 64 columns one slab (tile_rows x 128 bytes) further, the next
// 8 rows 1024 bytes further.
__device__ __forceinline__ uint64_t mn_major_desc(const void* tile, int tile_rows, int kk) {
  return SmemDesc(smem_addr(tile), tile_rows * kSlabRowBytes, 1024, true).at(kk * 16 * kSlabRowBytes);
}

// Byte offset of element (row, col) of such a tile: the 16-byte chunk index inside a row is
// XOR-ed with row % 8 (the 128-byte swizzle).
__host__ __device__ __forceinline__ constexpr uint32_t swizzled_offset(int tile_rows, int row, int col,
                                                                       int element_bytes) {
  const int per_slab = 128 / element_bytes, per_chunk = 16 / element_bytes;
  return (col / per_slab) * tile_rows * kSlabRowBytes + row * kSlabRowBytes +
         (((col % per_slab) / per_chunk) ^ (row % 8)) * 16 + (col % per_chunk) * element_bytes;
}

// A warpgroup accumulator of 64 x 16 Slices fp32 (8-column tiles x[t]) as the m16n8k16 A
// fragments of a register-sourced wgmma, one per k16 slice of its columns: the accumulator layout
// of columns 16 kk .. 16 kk + 15 is the A layout of that slice, so this is only rounding.
template <typename Element, int Slices>
__device__ __forceinline__ void pack_a_fragments(const float (&x)[2 * Slices][4], uint32_t (&a)[Slices][4]) {
  using Ops = ElementOps<Element>;
#pragma unroll
  for (int kk = 0; kk < Slices; ++kk) {
    a[kk][0] = Ops::pack(x[2 * kk][0], x[2 * kk][1]);
    a[kk][1] = Ops::pack(x[2 * kk][2], x[2 * kk][3]);
    a[kk][2] = Ops::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[kk][3] = Ops::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
  }
}

}  // namespace fat::sm90
