// Tile sizes and the shared-memory layout of the sm90 forward, per head dim, in one place.
#pragma once
#include <cstdint>

namespace fat::sm90 {

// A CTA owns BlockM = 64 x ConsumerWarpgroups query rows. Warpgroup 0 is the producer (one
// thread issues the TMA loads); each consumer warpgroup owns 64 rows and runs the wgmmas and the
// online softmax for them. K and V stream through a ring of Stages buffers.
//
// Shared-memory tiles are what TMA writes with 128-byte swizzle: per 64-column slab (one 128-byte
// swizzle atom wide) the tile's rows at 128 bytes each, slabs one after the other. wgmma reads
// them through descriptors that name the same swizzle.
// The FA-T switches (each measured with and without in benchmarks/NOTES.md):
//   TensorRowSum: the softmax row sum l as P x ones, one more wgmma beside P V;
//   LazyRescale:  o and l rescaled only when a row's max grows by more than 2^8 (softmax.h);
//   PingPong:     the consumer warpgroups take turns issuing their GEMMs (named barriers, in a
//                 ring), so one's softmax runs on the vector units while another's GEMMs run.
// ConsumerWarpgroups: 2 (BlockM 128) or 3 (BlockM 192: one more warp per SM sub-partition to
// interleave its exp2s with the others', at 160 registers a thread instead of 240).
// PolyExp2QuartersSoftcap: in the softcap variants (a tanh and an exp2 per score on MUFU), how
// many of every 4 score column tiles take exp2 from a polynomial on the FP32 pipe (OnlineSoftmax).
// TimingSkipSoftmax: a measurement build only (wrong output), see Consumer::scores_to_p.
template <typename Element_, int HeadDim_, int ConsumerWarpgroups_, bool TensorRowSum_, bool LazyRescale_,
          bool PingPong_, int PolyExp2QuartersSoftcap_ = 0, bool TimingSkipSoftmax_ = false>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim_;
  static constexpr bool kTensorRowSum = TensorRowSum_;
  static constexpr bool kLazyRescale = LazyRescale_;
  static constexpr bool kPingPong = PingPong_;
  static constexpr bool kTimingSkipSoftmax = TimingSkipSoftmax_;
  static constexpr int kPolyExp2QuartersSoftcap = PolyExp2QuartersSoftcap_;
  static constexpr int kConsumerWarpgroups = ConsumerWarpgroups_;
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;
  // hd256: 64 keys a block (S 32 registers beside O's 128; K and V 32 KB a stage).
  static constexpr int kBlockN = kHeadDim == 256 ? 64 : 128;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  // setmaxnreg budgets (multiples of 8, at most 64K in all): 40 x 128 + 232 x 256, or
  // 32 x 128 + 160 x 384 (the 3-warpgroup consumer loop spills at 152; the producer's per-tile
  // bookkeeping spills two words at 32, stored and loaded once per tile).
  static constexpr int kProducerRegisters = kConsumerWarpgroups == 2 ? 40 : 32;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 232 : 160;

  // The m16n8 view of a warp's part of a warpgroup accumulator (softmax and masks use it).
  static constexpr int kMTiles = 1, kSTiles = kBlockN / 8, kOTiles = kHeadDim / 8;
  // O += P V as wgmmas of N = kPvN columns (N is at most 128 in our wgmma wrappers).
  static constexpr int kPvN = kHeadDim < 128 ? kHeadDim : 128;

  static constexpr int kSlabs = kHeadDim / 64;  // 128-byte (64-column) slabs per row
  static constexpr int kSlabRowBytes = 128;
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  // Bytes of ones, read by the row-sum wgmma as its B operand (any layout reads ones).
  static constexpr uint32_t kOnesBytes = 1024;

  // Offsets from the 1024-byte aligned base (swizzle atoms repeat every 8 rows x 128 bytes).
  static constexpr uint32_t kQOffset = 0;
  static constexpr uint32_t kKOffset = kQOffset + kQBytes;
  static constexpr uint32_t kVOffset = kKOffset + kStages * kKVBytes;
  // The epilogue stages each consumer warp's 16 rows of O here, kOStageCols columns at a time,
  // before writing them out in 16-byte pieces. Rows are padded by 16 bytes: the accumulator
  // layout's 4-byte writes (8 rows x 4 column pairs per warp) then fall in 32 different banks.
  // (hd256 stages 64 columns at a time: its whole rows would not fit beside Q and the K/V ring.)
  static constexpr int kOStageCols = kHeadDim == 256 ? 64 : kHeadDim;
  static constexpr int kOStagePitch = kOStageCols + 8;  // elements
  static constexpr uint32_t kOStageWarpBytes = 16 * kOStagePitch * sizeof(Element);
  static constexpr uint32_t kOStageOffset = kVOffset + kStages * kKVBytes;
  static constexpr uint32_t kOnesOffset = kOStageOffset + 4 * kConsumerWarpgroups * kOStageWarpBytes;
  // ALiBi's key tile (alibi_keys_desc): each key's offset in its block, 16 columns a key, no swizzle.
  static constexpr uint32_t kAlibiKeysBytes = kBlockN * 16 * sizeof(Element);
  static constexpr uint32_t kAlibiKeysOffset = kOnesOffset + kOnesBytes;
  static constexpr uint32_t kBarrierOffset = kAlibiKeysOffset + kAlibiKeysBytes;
  // Q full, Q empty; per stage K full, V full, K empty, V empty (K is released a GEMM earlier
  // than V); per slot of the tile-index ring tile full, tile empty.
  static constexpr int kTileSlots = 2;
  static constexpr int kBarriers = 2 + 4 * kStages + 2 * kTileSlots;
  static constexpr uint32_t kTileSlotOffset = kBarrierOffset + kBarriers * 8;
  static constexpr int kSmemBytes = kTileSlotOffset + kTileSlots * 4 + 1024;  // + alignment slack

  static_assert(kConsumerWarpgroups == 2 || kConsumerWarpgroups == 3, "register budgets for 2 or 3");
  static_assert(kProducerRegisters * 128 + kConsumerRegisters * 128 * kConsumerWarpgroups <= 65536, "registers");
  static_assert(kHeadDim % 64 == 0, "whole 128-byte slabs");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

// Backward. A CTA owns BlockN = 128 keys (its K, V and dK, dV accumulators) and walks the query
// blocks (BlockM rows) that see them, for every q head of its kv head's group. Warpgroup 0 is the
// producer (warp 0: TMA loads; warp 1: lse and D rows; warp 2: the dQ reductions); each of the
// two consumer warpgroups owns 64 of the keys and computes, per query block,
//   S^T = K Q^T and dP^T = V dO^T (keys as wgmma rows, so P^T and dS^T come out in the registers
//   that feed dV += P^T dO and dK += dS^T Q as A operands), and a 64 x 64 piece of dQ = dS K from
//   the dS^T both warpgroups wrote to shared memory (rows of dQ split between the warpgroups at
//   BlockM 128, head-dim columns at BlockM 64).
// Q, dO, lse and D stream through a ring of Stages slots; dS^T has two buffers, so a warpgroup
// may write the next one while the other still reads this one; the fp32 dQ block is staged once
// and added to global memory by the bulk copy engine.
// Register budgets: hd128 keeps dK, dV (64 + 64), S^T, dP^T (32 + 32) and the dQ piece (32)
// per thread; hd64 at BlockM 128 keeps 32 + 32, 64 + 64 and 32.
template <typename Element_, int HeadDim_, int BlockM_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim_;
  static constexpr int kBlockM = BlockM_;
  // dQ of a step issued one step late, so the consumer warpgroups never meet inside a step (see
  // BwdConsumer::step): +3-4% at hd64 non-causal, -1-4% at hd128 (benchmarks/NOTES.md, sm90
  // backward step 15), so hd128 keeps the per-step meeting.
  static constexpr bool kDqOneStepLate = kHeadDim == 64;
  static constexpr int kBlockN = 128;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  // 24 + 240: the hd128 consumer spills at 232; the producer warps spill a few words per step at
  // 24, off the critical path (the ring runs two steps ahead).
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  // dQ = dS K as two 64 x 64 pieces: split by rows when BlockM is 128, by columns when it is 64.
  static constexpr bool kDqSplitRows = kBlockM == 128;

  static constexpr int kSlabRowBytes = 128;
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * sizeof(Element);  // keys x queries
  static constexpr uint32_t kDqBytes = kBlockM * kHeadDim * sizeof(float);
  static constexpr uint32_t kRowStatBytes = kBlockM * sizeof(float);

  static constexpr uint32_t kKOffset = 0;
  static constexpr uint32_t kVOffset = kKOffset + kKVBytes;
  static constexpr uint32_t kQOffset = kVOffset + kKVBytes;
  static constexpr uint32_t kDoOffset = kQOffset + kStages * kQBytes;
  static constexpr uint32_t kDsOffset = kDoOffset + kStages * kQBytes;
  static constexpr uint32_t kDqOffset = kDsOffset + 2 * kDsBytes;
  static constexpr uint32_t kLseOffset = kDqOffset + kDqBytes;  // per stage: lse * log2(e), then D
  static constexpr uint32_t kBarrierOffset = kLseOffset + kStages * 2 * kRowStatBytes;
  // K/V full, K/V empty; per stage Q full, Q empty; dQ full, dQ empty; kDqOneStepLate: per dS^T
  // buffer full, free.
  static constexpr int kBarriers = 2 + 2 * kStages + 2 + (kDqOneStepLate ? 2 * 2 : 0);
  static constexpr int kSmemBytes = kBarrierOffset + kBarriers * 8 + 1024;  // + alignment slack

  static_assert(kBlockM * kHeadDim == 2 * 64 * 64, "two 64 x 64 dQ pieces per query block");
  static_assert(kHeadDim % 64 == 0 && kBlockM % 64 == 0, "whole 128-byte slabs");
  static_assert(kProducerRegisters * 128 + kConsumerRegisters * 256 <= 65536, "registers");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

// Backward at head dim 256 (bwd_split_dim.h). A CTA's dK and dV for 128 keys would be 256 KB of
// fp32 (256 registers a consumer thread), so a CTA owns 64 keys and its two consumer warpgroups
// split the work two ways: per step (64 queries) warpgroup w computes S^T and dP^T for queries
// [32 w, 32 w + 32) of all 64 keys (K = 256), writes P^T and dS^T to shared memory, and after
// both halves are there adds dV, dK and dQ for head-dim columns [128 w, 128 w + 128) from them.
// dQ goes to dq_accum by vector reductions from the registers: a staged fp32 dQ block (64 KB)
// does not fit beside two Q/dO stages. Registers: dK, dV, dQ 64 each, S^T, dP^T 16 each (dead
// before dQ); P^T, dS^T double-buffered (a warpgroup writes step s + 1's while the other may
// still read step s's).
template <typename Element_>
struct BwdSplitDimTraits {
  using Element = Element_;
  static constexpr int kHeadDim = 256, kBlockM = 64, kBlockN = 64;
  static constexpr int kHalfM = kBlockM / 2, kHalfDim = kHeadDim / 2;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * sizeof(Element);  // one P^T or dS^T tile
  static constexpr uint32_t kRowStatBytes = kBlockM * sizeof(float);

  static constexpr uint32_t kKOffset = 0;
  static constexpr uint32_t kVOffset = kKOffset + kKVBytes;
  static constexpr uint32_t kQOffset = kVOffset + kKVBytes;
  static constexpr uint32_t kDoOffset = kQOffset + kStages * kQBytes;
  static constexpr uint32_t kDsOffset = kDoOffset + kStages * kQBytes;  // buffer b: P^T tile 2 b, dS^T 2 b + 1
  static constexpr uint32_t kDqOffset = kDsOffset;                      // (no staged dQ)
  static constexpr uint32_t kLseOffset = kDsOffset + 4 * kDsBytes;
  static constexpr uint32_t kBarrierOffset = kLseOffset + kStages * 2 * kRowStatBytes;
  static constexpr int kBarriers = 2 + 2 * kStages;  // K/V full, empty; per stage Q full, empty
  static constexpr int kSmemBytes = kBarrierOffset + kBarriers * 8 + 1024;  // + alignment slack

  static_assert(kProducerRegisters * 128 + kConsumerRegisters * 256 <= 65536, "registers");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

// The hd256 backward's dQ kernel (bwd_dq.h): a CTA owns 128 query rows (64 per consumer
// warpgroup) with their Q and dO resident and walks the 64-key blocks they see. K streams through
// two stages (read by S = Q K^T early in a block and by dQ += dS K at its end), V through one
// (read by dP = dO V^T only). lse and D live in registers (two rows a thread).
template <typename Element_>
struct BwdDqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = 256, kBlockM = 128, kBlockN = 64;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kKStages = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);   // Q or dO: 64 KB
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);  // a K or V block: 32 KB

  static constexpr uint32_t kQOffset = 0;
  static constexpr uint32_t kDoOffset = kQOffset + kQBytes;
  static constexpr uint32_t kKOffset = kDoOffset + kQBytes;
  static constexpr uint32_t kVOffset = kKOffset + kKStages * kKVBytes;
  static constexpr uint32_t kBarrierOffset = kVOffset + kKVBytes;
  static constexpr int kBarriers = 1 + 2 * kKStages + 2;  // Q/dO full; per K stage full, empty; V full, empty
  static constexpr int kSmemBytes = kBarrierOffset + kBarriers * 8 + 1024;  // + alignment slack

  static_assert(kProducerRegisters * 128 + kConsumerRegisters * 256 <= 65536, "registers");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA");
};

}  // namespace fat::sm90
