// Every tile-size choice of the sm80 kernels, per head dim, in one place.
#pragma once
#include "../common/smem_tile.h"

namespace fat::sm80 {

// Forward: a CTA owns BlockM query rows; each of its Warps owns BlockM / Warps of them (whole
// rows, so the softmax needs only quad shuffles) and walks the keys BlockN at a time.
// Q stays in shared memory; one K and one V buffer: the V load overlaps Q K^T, the next K load
// overlaps the softmax and P V.
template <typename Element_, int HeadDim_, int BlockM_, int BlockN_, int Warps_, bool TensorRowSum_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim_;
  static constexpr int kBlockM = BlockM_;
  static constexpr int kBlockN = BlockN_;
  static constexpr int kWarps = Warps_;
  static constexpr int kThreads = Warps_ * 32;
  static constexpr bool kTensorRowSum = TensorRowSum_;

  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
  static constexpr int kSTiles = kBlockN / 8;        // n8 tiles of a score row block
  static constexpr int kOTiles = kHeadDim / 8;       // n8 tiles of an output row block
  static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles");

  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = QTile::kBytes + 2 * KVTile::kBytes;
};

// Per head dim: measured choices (benchmarks/NOTES.md).
template <typename Element, int HeadDim, bool TensorRowSum>
struct FwdConfig;
template <typename Element, bool TensorRowSum>
struct FwdConfig<Element, 64, TensorRowSum> {
  using Traits = FwdTraits<Element, 64, 128, 128, 4, TensorRowSum>;
};
template <typename Element, bool TensorRowSum>
struct FwdConfig<Element, 128, TensorRowSum> {
  using Traits = FwdTraits<Element, 128, 128, 64, 4, TensorRowSum>;
};

// Backward: a CTA owns BlockN keys (K, V and the dK, dV accumulators stay put) and walks the
// query rows BlockM at a time, Q and dO double-buffered.
//   S = Q K^T, dP = dO V^T: warp w computes rows 16 (w % 4), keys (BlockN / 2) (w / 4)
//   dV += P^T dO, dK += dS^T Q: warp w owns keys 16 w (P and dS go through shared memory)
//   dQ += dS K: warp w computes rows 16 (w % 4), head-dim half w / 4, added to fp32 dq_accum.
template <typename Element_, int HeadDim_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 128;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;

  static constexpr int kSTiles = kBlockN / 2 / 8;   // n8 tiles of a warp's S / dP block
  static constexpr int kKVTiles = kHeadDim / 8;     // n8 tiles of a warp's dK / dV rows
  static constexpr int kDqTiles = kHeadDim / 2 / 8; // n8 tiles of a warp's dQ block
  static_assert(kBlockM == 16 * 4 && kBlockN == 16 * kWarps, "warp layout above");

  using QTile = SmemTile<kBlockM, kHeadDim>;   // Q and dO, two stages each
  using KVTile = SmemTile<kBlockN, kHeadDim>;  // K and V
  using PTile = SmemTile<kBlockM, kBlockN>;    // P and dS
  static constexpr int kSmemBytes = 2 * KVTile::kBytes + 4 * QTile::kBytes + 2 * PTile::kBytes;
};

}  // namespace fat::sm80
