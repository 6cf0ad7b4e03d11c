// Every tile-size choice of the sm80 kernels, per head dim, in one place.
#pragma once
#include "../common/smem_tile.h"

namespace fat::sm80 {

// Forward: a CTA owns BlockM query rows; each of its Warps owns BlockM / Warps of them (whole
// rows, so the softmax needs only quad shuffles) and walks the keys BlockN at a time.
// Q stays in shared memory; one K and one V buffer: the V load overlaps Q K^T, the next K load
// overlaps the softmax and P V. Prefetch: issue each GEMM's next B fragment load (ldmatrix)
// before the current fragment's MMAs.
template <typename Element_, int HeadDim_, int BlockM_, int BlockN_, int Warps_, bool Prefetch_, bool TensorRowSum_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim_;
  static constexpr int kBlockM = BlockM_;
  static constexpr int kBlockN = BlockN_;
  static constexpr int kWarps = Warps_;
  static constexpr int kThreads = Warps_ * 32;
  static constexpr bool kTensorRowSum = TensorRowSum_;
  static constexpr bool kPrefetch = Prefetch_;

  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;  // m16 tiles per warp
  static constexpr int kSTiles = kBlockN / 8;        // n8 tiles of a score row block
  static constexpr int kOTiles = kHeadDim / 8;       // n8 tiles of an output row block
  static_assert(kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles");

  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = QTile::kBytes + 2 * KVTile::kBytes;
};

// Per head dim: measured choices (benchmarks/NOTES.md). Prefetch wins 1-4% at hd128 and loses
// 1-5% at hd64 (same run).
template <typename Element, int HeadDim, bool TensorRowSum>
struct FwdConfig;
template <typename Element, bool TensorRowSum>
struct FwdConfig<Element, 64, TensorRowSum> {
  using Traits = FwdTraits<Element, 64, 128, 128, 4, false, TensorRowSum>;
};
template <typename Element, bool TensorRowSum>
struct FwdConfig<Element, 128, TensorRowSum> {
  using Traits = FwdTraits<Element, 128, 128, 64, 4, true, TensorRowSum>;
};
// hd256: 8 warps of 16 rows (an O row block of 16 x 256 is 128 fp32 registers per thread). No
// prefetch: with it ptxas kept the fragment buffers in local memory (a 160-byte stack frame).
template <typename Element, bool TensorRowSum>
struct FwdConfig<Element, 256, TensorRowSum> {
  using Traits = FwdTraits<Element, 256, 128, 64, 8, false, TensorRowSum>;
};

// Backward: a CTA owns BlockN keys (K, V and the dK, dV accumulators stay put) and walks the
// query rows BlockM at a time, Q and dO double-buffered. Three warp layouts, one per GEMM shape:
//   S = Q K^T, dP = dO V^T:   SdpWarpsM x SdpWarpsN warps over (BlockM rows, BlockN keys)
//   dV += P^T dO, dK += dS^T Q: KvWarpsN x KvWarpsD warps over (BlockN keys, HeadDim)
//   dQ += dS K:                DqWarpsM x DqWarpsD warps over (BlockM rows, HeadDim)
// P and dS go through shared memory between the first and the other two. Square-ish warp tiles
// keep the ldmatrix count per MMA low: shared-memory bandwidth, not MMA issue, bounds this kernel.
template <typename Element_, int HeadDim_, int BlockM_, int SdpWarpsM_, int KvWarpsN_, int DqWarpsM_,
          int BlockN_ = 128>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim_;
  static constexpr int kBlockM = BlockM_;
  static constexpr int kBlockN = BlockN_;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;

  static constexpr int kSdpWarpsM = SdpWarpsM_, kSdpWarpsN = kWarps / SdpWarpsM_;
  static constexpr int kSdpMTiles = kBlockM / kSdpWarpsM / 16, kSdpNTiles = kBlockN / kSdpWarpsN / 8;
  static constexpr int kKvWarpsN = KvWarpsN_, kKvWarpsD = kWarps / KvWarpsN_;
  static constexpr int kKvMTiles = kBlockN / kKvWarpsN / 16, kKvNTiles = kHeadDim / kKvWarpsD / 8;
  static constexpr int kDqWarpsM = DqWarpsM_, kDqWarpsD = kWarps / DqWarpsM_;
  static constexpr int kDqMTiles = kBlockM / kDqWarpsM / 16, kDqNTiles = kHeadDim / kDqWarpsD / 8;
  static_assert(kSdpMTiles >= 1 && kSdpNTiles % 2 == 0 && kKvMTiles >= 1 && kKvNTiles % 2 == 0 &&
                    kDqMTiles >= 1 && kDqNTiles % 2 == 0,
                "warp tiles must be whole m16 tiles and pairs of n8 tiles");

  using QTile = SmemTile<kBlockM, kHeadDim>;   // Q and dO, two stages each
  using KVTile = SmemTile<kBlockN, kHeadDim>;  // K and V
  using PTile = SmemTile<kBlockM, kBlockN>;    // P and dS
  static constexpr int kRowStatsBytes = 2 * 2 * kBlockM * 4;  // lse and D per row, two stages
  static constexpr int kSmemBytes = 2 * KVTile::kBytes + 4 * QTile::kBytes + 2 * PTile::kBytes + kRowStatsBytes;
  // sm90: the dQ block (fp32) is staged in shared memory exactly as its rows lie in dq_accum
  // (contiguous, columns swizzled by dq_accum_col) and added by one bulk reduction.
  static constexpr int kSmemBytesBulkDq = kSmemBytes + kBlockM * kHeadDim * 4;
};

template <typename Element, int HeadDim>
struct BwdConfig;
template <typename Element>
struct BwdConfig<Element, 64> {
  using Traits = BwdTraits<Element, 64, 128, 2, 4, 4>;
};
template <typename Element>
struct BwdConfig<Element, 128> {
  using Traits = BwdTraits<Element, 128, 64, 2, 4, 2>;
};
// hd256: 64 keys and 32 query rows per step, so that K, V, two stages of Q and dO and the sm90
// build's fp32 dQ staging fit in shared memory (168 KB).
template <typename Element>
struct BwdConfig<Element, 256> {
  using Traits = BwdTraits<Element, 256, 32, 2, 4, 2, 64>;
};

}  // namespace fat::sm80
