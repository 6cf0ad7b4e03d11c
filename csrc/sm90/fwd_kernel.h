// sm90 forward: TMA loads into a shared-memory ring completed on mbarriers, wgmma, warp
// specialization. Persistent: one CTA per SM takes tiles (query block, head, batch) from a
// run-time queue (TileQueue), its producer loading the next tile's Q and first K/V blocks while
// the consumers finish the current one.
//   producer warpgroup: one thread loads each tile's Q, then K and V of each key block (last to
//                       first, so the blocks that need masking come first) into the ring;
//   consumer warpgroups: 64 query rows each; S = Q K^T (both from shared memory), online softmax
//                       in registers, O += P V (P from registers, V from shared memory), and with
//                       TensorRowSum the row sum l = P x ones as one more wgmma beside it (FA-T's
//                       tensorized sum). Each step issues S(i) = Q K(i)^T and O += P(i-1) V(i-1)
//                       together and runs the softmax of S(i) while P V is still on the tensor
//                       cores; with PingPong the warpgroups (2, or 3 at hd64) also take turns
//                       issuing, so one's softmax overlaps the others' GEMMs. O leaves through
//                       per-warp staging rows in shared memory (store).
#pragma once
#include <cuda.h>

#include <cmath>

#include "../common/mask.h"
#include "../common/seq_info.h"
#include "../common/sm90_ptx.h"
#include "../common/softmax.h"
#include "../params.h"
#include "operands.h"
#include "pipeline.h"
#include "scheduler.h"
#include "traits.h"

namespace fat::sm90 {

// The shared-memory carve-up of traits.h, from a base aligned up to 1024 bytes.
template <typename Traits>
struct FwdSmem {
  using Element = typename Traits::Element;
  char* base;
  __device__ __forceinline__ explicit FwdSmem(char* raw)
      : base(raw + ((1024 - (smem_addr(raw) & 1023)) & 1023)) {}
  __device__ __forceinline__ Element* q() const { return reinterpret_cast<Element*>(base + Traits::kQOffset); }
  __device__ __forceinline__ Element* k(int stage) const {
    return reinterpret_cast<Element*>(base + Traits::kKOffset + stage * Traits::kKVBytes);
  }
  __device__ __forceinline__ Element* v(int stage) const {
    return reinterpret_cast<Element*>(base + Traits::kVOffset + stage * Traits::kKVBytes);
  }
  // Consumer warp w's (0 = the first consumer warp) staging rows for its O.
  __device__ __forceinline__ Element* o_stage(int w) const {
    return reinterpret_cast<Element*>(base + Traits::kOStageOffset + w * Traits::kOStageWarpBytes);
  }
  __device__ __forceinline__ uint32_t* ones() const { return reinterpret_cast<uint32_t*>(base + Traits::kOnesOffset); }
  __device__ __forceinline__ uint32_t* alibi_keys() const {
    return reinterpret_cast<uint32_t*>(base + Traits::kAlibiKeysOffset);
  }
  __device__ __forceinline__ uint64_t* barriers() const {
    return reinterpret_cast<uint64_t*>(base + Traits::kBarrierOffset);
  }
  __device__ __forceinline__ uint64_t* q_full() const { return barriers(); }
  __device__ __forceinline__ uint64_t* q_empty() const { return barriers() + 1; }
  __device__ __forceinline__ uint64_t* k_full(int stage) const { return barriers() + 2 + stage; }
  __device__ __forceinline__ uint64_t* v_full(int stage) const { return barriers() + 2 + Traits::kStages + stage; }
  __device__ __forceinline__ uint64_t* k_empty(int stage) const { return barriers() + 2 + 2 * Traits::kStages + stage; }
  __device__ __forceinline__ uint64_t* v_empty(int stage) const { return barriers() + 2 + 3 * Traits::kStages + stage; }
  __device__ __forceinline__ uint64_t* tile_full(int slot) const { return barriers() + 2 + 4 * Traits::kStages + slot; }
  __device__ __forceinline__ uint64_t* tile_empty(int slot) const {
    return barriers() + 2 + 4 * Traits::kStages + Traits::kTileSlots + slot;
  }
  __device__ __forceinline__ int* tile_slot(int slot) const {
    return reinterpret_cast<int*>(base + Traits::kTileSlotOffset) + slot;
  }
};

// Where this CTA stands in its two rings: Q (one slot, filled once per tile) and K/V (Stages
// slots, filled once per key block). Producer and consumers advance them past the same tiles.
template <int Stages>
struct RingCounters {
  RingPosition<1> q;
  RingPosition<Stages> kv;
  // The K/V fill of the i-th key block of the current tile.
  __device__ __forceinline__ RingPosition<Stages> block(int i) const { return kv.plus(i); }
  // Past a tile that loaded its Q and key_blocks blocks.
  __device__ __forceinline__ void advance(int key_blocks) {
    q = q.plus(1);
    kv = kv.plus(key_blocks);
  }
};

// The tiles of one launch: (query block, head, batch), query blocks fastest so that the CTAs
// running at one time share K/V in L2; under causal the last query blocks (the most keys) first.
struct TileGrid {
  int m_blocks, count;
  __device__ __forceinline__ TileGrid(const FwdParams& p, int block_m) {
    m_blocks = ceil_div(p.seqlen_q, block_m);
    count = m_blocks * p.heads * p.batch;
  }
};

// Which query block of which sequence a tile is, and the key blocks it visits.
template <typename Traits, typename Mask>
struct FwdBlock {
  SeqInfo seq;
  Mask mask;
  int m_block, head, first_row, n_begin, n_end;  // key blocks [n_begin, n_end), visited last to first
  __device__ __forceinline__ FwdBlock(const FwdParams& p, const TileGrid& grid, int tile)
      : seq(p, tile / (grid.m_blocks * p.heads)), mask(seq, p) {
    const int m = tile % grid.m_blocks;
    m_block = Mask::kCausal ? grid.m_blocks - 1 - m : m;
    head = tile / grid.m_blocks % p.heads;
    first_row = m_block * Traits::kBlockM;
    n_begin = mask.n_begin(first_row, Traits::kBlockN);
    n_end = mask.n_end(first_row, Traits::kBlockM, Traits::kBlockN);
  }
  // Nothing to load or compute: past the sequence's end (varlen), or no visible key (the
  // consumers still write zeros and lse = +inf for such a block's rows).
  __device__ __forceinline__ bool empty() const { return first_row >= seq.len_q; }
  __device__ __forceinline__ bool has_keys() const { return !empty() && blocks() > 0; }
  __device__ __forceinline__ int blocks() const { return n_end - n_begin; }
  // TMA coordinates of a tensor's row `row` of this sequence: (row, batch) in the 4-d maps.
  __device__ __forceinline__ int q_row(int row) const { return static_cast<int>(seq.first_q) + row; }
  __device__ __forceinline__ int k_row(int row) const { return static_cast<int>(seq.first_k) + row; }
  __device__ __forceinline__ int batch_coord() const { return seq.varlen ? 0 : seq.batch; }
  __device__ __forceinline__ int kv_batch_coord() const { return seq.varlen_k ? 0 : seq.batch_k; }
};

// ---- producer: one thread keeps the ring full, one tile after another.
template <typename Traits, typename Mask>
__device__ __forceinline__ void produce(const FwdBlock<Traits, Mask>& blk, const FwdParams& p,
                                        const CUtensorMap* tma_q, const CUtensorMap* tma_k, const CUtensorMap* tma_v,
                                        const FwdSmem<Traits>& sm, const RingCounters<Traits::kStages>& ring) {
  constexpr int kSlabElems = 64;
  const int head_k = blk.head / (p.heads / p.heads_k), b = blk.batch_coord(), b_k = blk.kv_batch_coord();
  ring.q.wait_empty(sm.q_empty());  // consumers done with the last Q
  mbar_arrive_expect_tx(sm.q_full(), Traits::kQBytes);
#pragma unroll
  for (int slab = 0; slab < Traits::kSlabs; ++slab)
    tma_load_4d(sm.q() + slab * Traits::kBlockM * kSlabElems, tma_q, sm.q_full(), slab * kSlabElems,
                blk.q_row(blk.first_row), blk.head, b);
  for (int i = 0; i < blk.blocks(); ++i) {
    const RingPosition<Traits::kStages> slot = ring.block(i);
    const int n = blk.n_end - 1 - i, stage = slot.stage(), use = slot.use();
    const int row = blk.k_row(n * Traits::kBlockN);
    // (RingPosition::wait_empty spelled out: in that form ptxas unrolls this loop twice as far.)
    if (use > 0) mbar_wait(sm.k_empty(stage), (use - 1) & 1);  // consumers done with its last use
    mbar_arrive_expect_tx(sm.k_full(stage), Traits::kKVBytes);
#pragma unroll
    for (int slab = 0; slab < Traits::kSlabs; ++slab)
      tma_load_4d(sm.k(stage) + slab * Traits::kBlockN * kSlabElems, tma_k, sm.k_full(stage), slab * kSlabElems, row,
                  head_k, b_k);
    if (use > 0) mbar_wait(sm.v_empty(stage), (use - 1) & 1);
    mbar_arrive_expect_tx(sm.v_full(stage), Traits::kKVBytes);
#pragma unroll
    for (int slab = 0; slab < Traits::kSlabs; ++slab)
      tma_load_4d(sm.v(stage) + slab * Traits::kBlockN * kSlabElems, tma_v, sm.v_full(stage), slab * kSlabElems, row,
                  head_k, b_k);
  }
}

// The same from a paged cache (a kernel of its own: beside the paged loop, ptxas spilled in the
// plain producer's per-tile path, 1-4% on short causal sequences). A key block arrives as boxes
// of paged_box_rows() rows, each inside one page (params.h), one TMA per box and 64-column slab;
// boxes land at their rows' offsets in the slab, where the 128-byte swizzle (which follows the
// shared-memory address) makes them the same tile one box would. One thread issuing them all,
// each behind its page index (16 TMAs for K and 16 for V per block at 16-row pages), held the
// cache read to ~2.6 TB/s, so the producer's whole warp issues them: lane l takes box l / kSlabs
// and slab l % kSlabs, its page index loaded one block ahead (the load's latency hides behind the
// wait for the next free stage). Lane 0 alone loads Q and arms the mbarriers.
template <typename Traits, typename Mask>
__device__ __forceinline__ void produce_paged(const FwdBlock<Traits, Mask>& blk, const FwdParams& p,
                                              const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                              const CUtensorMap* tma_v, const FwdSmem<Traits>& sm,
                                              const RingCounters<Traits::kStages>& ring, int lane) {
  constexpr int kSlabElems = 64;
  const int head_k = blk.head / (p.heads / p.heads_k), b = blk.batch_coord(), b_k = blk.kv_batch_coord();
  const int box_row = lane / Traits::kSlabs * paged_box_rows(p), slab = lane % Traits::kSlabs;
  const bool issues = box_row < Traits::kBlockN;
  const int dst_offset = (slab * Traits::kBlockN + box_row) * kSlabElems;
  const int* table = p.block_table + b_k * p.block_table_stride;
  int page = 0, page_row = 0;  // where this lane's box of the next key block is in the cache
  const auto locate = [&](int block_row) {
    const int slot = (block_row + box_row) / p.page_size;
    page_row = block_row + box_row - slot * p.page_size;
    page = table[min(slot, p.max_pages - 1)];
  };
  if (issues) locate(blk.k_row((blk.n_end - 1) * Traits::kBlockN));
  if (lane == 0) {
    ring.q.wait_empty(sm.q_empty());
    mbar_arrive_expect_tx(sm.q_full(), Traits::kQBytes);
#pragma unroll
    for (int s = 0; s < Traits::kSlabs; ++s)
      tma_load_4d(sm.q() + s * Traits::kBlockM * kSlabElems, tma_q, sm.q_full(), s * kSlabElems,
                  blk.q_row(blk.first_row), blk.head, b);
  }
#pragma unroll 1
  for (int i = 0; i < blk.blocks(); ++i) {
    const RingPosition<Traits::kStages> slot = ring.block(i);
    const int n = blk.n_end - 1 - i, stage = slot.stage(), use = slot.use();
    if (use > 0) mbar_wait(sm.k_empty(stage), (use - 1) & 1);
    if (lane == 0) mbar_arrive_expect_tx(sm.k_full(stage), Traits::kKVBytes);
    __syncwarp();  // the expected bytes are armed before any box lands
    const int safe_page = min(max(page, 0), p.batch_k - 1);  // a malformed table reads a real page
    if (issues)
      tma_load_4d(sm.k(stage) + dst_offset, tma_k, sm.k_full(stage), slab * kSlabElems, page_row, head_k,
                  safe_page);
    if (use > 0) mbar_wait(sm.v_empty(stage), (use - 1) & 1);
    if (lane == 0) mbar_arrive_expect_tx(sm.v_full(stage), Traits::kKVBytes);
    __syncwarp();
    if (issues)
      tma_load_4d(sm.v(stage) + dst_offset, tma_v, sm.v_full(stage), slab * kSlabElems, page_row, head_k,
                  safe_page);
    if (issues && i + 1 < blk.blocks()) locate(blk.k_row((n - 1) * Traits::kBlockN));
  }
}

// ALiBi's bias is -coef (key - position) left of the diagonal, -coef (position - key) right of it
// (Variant::alibi_coef; the softmax takes rows shifted by a per-row constant, add_alibi_shifted),
// so a key block wholly on one side of a warpgroup's rows adds the same +-coef x key to every
// row: the S wgmma adds the part that varies inside the block, +-coef x (key - the block's first
// key), as one more k16 step -- A holds +-coef in columns 0-2 of every row (split into three
// 16-bit parts, so that the sum keeps fp32's precision) and B this tile, each key's offset in its
// block in columns 0-2 -- and the block's first key's part joins the row offsets of the online
// softmax. No FP32 op per score is left for such blocks (the add it replaces was the whole of
// ALiBi's cost: the softmax is issue-bound). The tile: no swizzle, K-major, 8 x 8 core matrices
// of 128 bytes, the two of an 8-key group (columns 0-7, 8-15) 128 bytes apart (the leading
// byte offset), 8-key groups 256 bytes apart (the stride byte offset).
template <typename Traits>
__device__ __forceinline__ void write_alibi_keys(const FwdSmem<Traits>& sm) {
  using Ops = ElementOps<typename Traits::Element>;
  constexpr int kWords = Traits::kBlockN * 8;  // 16 columns a key, two a word
  for (int w = threadIdx.x; w < kWords; w += Traits::kThreads) {
    const int byte = 4 * w, key = byte / 256 * 8 + byte % 128 / 16, col = byte / 128 % 2 * 8 + byte % 16 / 2;
    const float offset = static_cast<float>(key);  // (exact in 16 bits: at most 127)
    sm.alibi_keys()[w] = Ops::pack(col < 3 ? offset : 0.f, col + 1 < 3 ? offset : 0.f);
  }
}
template <typename Traits>
__device__ __forceinline__ uint64_t alibi_keys_desc(const FwdSmem<Traits>& sm) {
  return SmemDesc(smem_addr(sm.alibi_keys()), 128, 256, false).at(0);
}

// ---- consumer: one warpgroup, 64 query rows.
template <typename Traits, typename Mask>
struct Consumer {
  using Element = typename Traits::Element;
  static constexpr int kSTiles = Traits::kSTiles, kOTiles = Traits::kOTiles, kPSlices = Traits::kBlockN / 16;
  static constexpr int kGroups = Traits::kBlockN / 32;  // dropout's 32-key draws per key block
  static_assert(!(Mask::kDropout && Traits::kTensorRowSum), "dropout needs the row sum of the undropped P");
  static_assert(!(Mask::kAlibi && Mask::kSoftcap), "the S wgmma adds ALiBi's bias before any softcap could apply");

  using Softmax = OnlineSoftmax<1, Traits::kTensorRowSum, Traits::kLazyRescale,
                                Mask::kSoftcap ? Traits::kPolyExp2QuartersSoftcap : 0>;

  const FwdBlock<Traits, Mask>& blk;
  const FwdSmem<Traits>& sm;
  const RingCounters<Traits::kStages>& ring;
  int warpgroup, wg_row, warp_first_row, lane;

  __device__ __forceinline__ Consumer(const FwdBlock<Traits, Mask>& blk_, const FwdSmem<Traits>& sm_,
                                      const RingCounters<Traits::kStages>& ring_, int wg)
      : blk(blk_), sm(sm_), ring(ring_), warpgroup(wg), wg_row(wg * 64), lane(threadIdx.x % 32) {
    warp_first_row = blk.first_row + wg_row + threadIdx.x / 32 % 4 * 16;  // in the sequence
  }

  // Where the i-th visited key block lives: its index n (visited last to first) and ring slot.
  __device__ __forceinline__ int block_of(int i) const { return blk.n_end - 1 - i; }
  __device__ __forceinline__ int stage_of(int i) const { return ring.block(i).stage(); }

  // PingPong turns: a warpgroup waits for its turn before issuing a step's GEMMs and hands the
  // turn to the next one in the ring right after (the last hands warpgroup 0 the first turn of
  // the launch). Each barrier meets two warpgroups: the waiter and the one passing it the turn.
  // All take blocks() + 1 turns per tile, so the ring stays in step across tiles.
  __device__ __forceinline__ void wait_turn() const {
    if constexpr (Traits::kPingPong) Barriers::fwd_turn(warpgroup).sync();
  }
  __device__ __forceinline__ void pass_turn() const {
    if constexpr (Traits::kPingPong) Barriers::fwd_turn((warpgroup + 1) % Traits::kConsumerWarpgroups).arrive();
  }

  // S = Q K(i)^T, issued (not waited for); with ALiBi plus the key-offset part of the bias
  // (write_alibi_keys; alibi_word: this lane's A word, 0 for a block across the diagonal).
  __device__ __forceinline__ void issue_qk(float (&s)[kSTiles][4], int i, uint32_t alibi_word = 0u) const {
    const uint32_t alibi_a[4] = {alibi_word, alibi_word, 0u, 0u};  // rows r, r + 8; columns 0-7 (A layout)
    ring.block(i).wait_full(sm.k_full(stage_of(i)));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk)
      wgmma_ss<Element, Traits::kBlockN>(s, kmajor_desc(sm.q(), Traits::kBlockM, wg_row, kk),
                                         kmajor_desc(sm.k(stage_of(i)), Traits::kBlockN, 0, kk), kk > 0);
    if constexpr (Mask::kAlibi) wgmma_rs<Element, Traits::kBlockN, false>(s, alibi_a, alibi_keys_desc(sm), 1);
    wgmma_commit();
  }

  // ALiBi: this lane's word of the A operand that adds -coef x (key offset) to S: +-coef split in
  // three 16-bit parts in columns 0-2 of every row (lanes 0 mod 4 hold columns 0-1, lanes 1 mod 4
  // columns 2-3 of the m16n8k16 A layout).
  __device__ __forceinline__ uint32_t alibi_lane_word() const {
    using Ops = ElementOps<Element>;
    const float c = -blk.mask.alibi_coef(blk.head), hi = Ops::rounded(c), mid = Ops::rounded(c - hi);
    const float lo = c - hi - mid;
    return lane % 4 == 0 ? Ops::pack(hi, mid) : lane % 4 == 1 ? Ops::pack(lo, 0.f) : 0u;
  }
  // Where key block i lies from this warpgroup's rows: -1 wholly left (always under causal, whose
  // bias is -coef x key for every key), +1 wholly right, 0 across the diagonal (the softmax then
  // adds the bias per score).
  __device__ __forceinline__ int alibi_side(int i) const {
    if constexpr (Mask::kCausal) return -1;
    const int first_col = block_of(i) * Traits::kBlockN, first_position = blk.first_row + wg_row + blk.mask.shift;
    return first_col + Traits::kBlockN - 1 <= first_position ? -1 : first_col > first_position + 63 ? 1 : 0;
  }
  // Block i's word, computed before the GEMMs are issued (fenced: written between the wgmmas
  // of one batch, it would make ptxas serialise them).
  __device__ __forceinline__ uint32_t alibi_word(uint32_t left_word, int i) const {
    if constexpr (!Mask::kAlibi) return 0u;
    const int side = alibi_side(i);
    uint32_t word = side < 0 ? left_word : side > 0 ? left_word ^ 0x80008000u : 0u;  // (+coef: halves negated)
    fence_operand(word);
    return word;
  }

  // O += P V(i), and l += P x ones, issued (not waited for). P is already packed: registers
  // written between the wgmmas of one batch make ptxas serialise them (warning C7519).
  __device__ __forceinline__ void issue_pv(float (&o)[kOTiles][4], float (&row_sum)[1][4],
                                           const uint32_t (&p)[kPSlices][4], int i) const {
    const uint64_t ones = SmemDesc(smem_addr(sm.ones()), 128, 128, false).at(0);
    ring.block(i).wait_full(sm.v_full(stage_of(i)));
    wgmma_fence();
    constexpr int kPvTiles = Traits::kPvN / 8, kPvSlabs = Traits::kPvN / 64;
#pragma unroll
    for (int kk = 0; kk < kPSlices; ++kk) {
#pragma unroll
      for (int c = 0; c < Traits::kHeadDim / Traits::kPvN; ++c)  // column chunks of O and V
        wgmma_rs<Element, Traits::kPvN>(
            reinterpret_cast<float(&)[kPvTiles][4]>(o[c * kPvTiles]), p[kk],
            mn_major_desc(sm.v(stage_of(i)) + c * kPvSlabs * Traits::kBlockN * 64, Traits::kBlockN, kk), 1);
      if constexpr (Traits::kTensorRowSum) wgmma_rs<Element, 8>(row_sum, p[kk], ones, 1);
    }
    wgmma_commit();
  }

  // Dropout: the keep bits of key block i for this lane's rows, drawn while the block's S is on
  // the tensor cores (the integer work beside the GEMMs), and applied to P once it is packed --
  // after the row sum (exponentiate's, on the FP32 pipe) has taken the undropped P.
  __device__ __forceinline__ void draw_keep(uint32_t (&keep)[2][kGroups], int bh, int i) const {
    if constexpr (Mask::kDropout) draw_keep_bits(keep, blk.mask, bh, warp_first_row, block_of(i) * Traits::kBlockN);
  }
  __device__ __forceinline__ static void drop(uint32_t (&pfrag)[kPSlices][4], const uint32_t (&keep)[2][kGroups]) {
    if constexpr (Mask::kDropout)
#pragma unroll
      for (int kk = 0; kk < kPSlices; ++kk) drop_a_fragment(pfrag[kk], kk, keep);
  }

  // Tells the producer this warp no longer reads a ring slot.
  __device__ __forceinline__ static void release(uint64_t* empty) { warp_release(empty); }

  __device__ __forceinline__ void mask(float (&s)[kSTiles][4], int i) const {
    const int first_col = block_of(i) * Traits::kBlockN;
    const bool needs_mask = blk.mask.block_needs_mask(blk.first_row + wg_row, 64, first_col, Traits::kBlockN);
    float(&s3)[1][kSTiles][4] = reinterpret_cast<float(&)[1][kSTiles][4]>(s);
    if (needs_mask) mask_scores(s3, blk.mask, warp_first_row, first_col);
  }

  // The vector work of a step: mask S(i) and turn it into P. A timing build
  // (FLASH_ATTN_T_TIMING_SKIP_SOFTMAX=1) leaves it out to measure how long it keeps the tensor
  // cores waiting (the FA-T "vector interval"); its output is wrong.
  __device__ __forceinline__ void scores_to_p(float (&s)[1][kSTiles][4], int i, float scale_log2, Softmax& softmax,
                                              float (&correction)[1][2]) const {
    if constexpr (Traits::kTimingSkipSoftmax) {
      correction[0][0] = correction[0][1] = 1.f;
    } else {
      if constexpr (Mask::kSoftcap) {
#pragma unroll
        for (int t = 0; t < kSTiles; ++t)
#pragma unroll
          for (int j = 0; j < 4; ++j) s[0][t][j] = blk.mask.score(s[0][t][j]);
      }
      if constexpr (Mask::kAlibi) {
        const float coef = blk.mask.alibi_coef(blk.head);
        const int side = alibi_side(i), first_col = block_of(i) * Traits::kBlockN;
        float offset[1][2];
        if (side != 0) {  // S has the key offsets' part (issue_qk): the block's first key's joins the rows'
          const float first_key_part = (side < 0 ? -coef : coef) * static_cast<float>(first_col);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float position = static_cast<float>(warp_first_row + blk.mask.shift + lane / 4 + 8 * r);
            offset[0][r] = side > 0 ? fmaf(-2.f * coef, position, first_key_part) : first_key_part;
          }
        } else if constexpr (!Mask::kCausal) {  // rows shifted (add_alibi_shifted): two ops per score
          add_alibi_shifted(s, blk.mask, coef, warp_first_row, first_col, offset);
        }
        mask(s[0], i);
        softmax.exponentiate(s, scale_log2, correction, offset);
      } else {
        mask(s[0], i);
        softmax.exponentiate(s, scale_log2, correction);
      }
    }
  }

  // Whether all of this warpgroup's rows lie past the sequence's end: a decode tile's packed
  // query rows (at most 64) leave every warpgroup but the first idle.
  __device__ __forceinline__ bool idle() const { return blk.first_row + wg_row >= blk.seq.len_q; }

  // An idle warpgroup's part of a tile: no GEMMs, only the turns and ring releases a working one
  // gives, so the producer and the working warpgroup run as before. Each release waits for its
  // fill to land first, so it can never count toward the slot's next fill.
  __device__ __forceinline__ void keep_in_step() const {
    ring.q.wait_full(sm.q_full());
    for (int i = 0; i < blk.blocks(); ++i) {
      wait_turn();
      pass_turn();
      ring.block(i).wait_full(sm.k_full(stage_of(i)));
      release(sm.k_empty(stage_of(i)));
      ring.block(i).wait_full(sm.v_full(stage_of(i)));
      release(sm.v_empty(stage_of(i)));
    }
    wait_turn();
    pass_turn();
    release(sm.q_empty());
  }

  __device__ __forceinline__ void run(const FwdParams& p) const {
    float o[1][kOTiles][4];
#pragma unroll
    for (int ot = 0; ot < kOTiles; ++ot)
#pragma unroll
      for (int j = 0; j < 4; ++j) o[0][ot][j] = 0.f;
    Softmax softmax;
    float s[1][kSTiles][4];
    uint32_t pfrag[kPSlices][4];
    float correction[1][2];
    uint32_t keep[2][kGroups];
    [[maybe_unused]] const int bh = blk.seq.batch * p.heads + blk.head;  // dropout's (batch, head) counter word

    [[maybe_unused]] const uint32_t alibi_left_word = Mask::kAlibi ? alibi_lane_word() : 0u;

    if (blk.has_keys()) {
      ring.q.wait_full(sm.q_full());

      // prologue: S(0) and its softmax
      const uint32_t alibi_first = alibi_word(alibi_left_word, 0);
      wait_turn();
      issue_qk(s[0], 0, alibi_first);
      pass_turn();
      draw_keep(keep, bh, 0);
      wgmma_wait<0>();
      fence_operand(s[0]);
      release(sm.k_empty(stage_of(0)));
      if (blk.blocks() == 1) release(sm.q_empty());
      scores_to_p(s, 0, p.scale_log2, softmax, correction);
      pack_a_fragments<Element>(s[0], pfrag);
      drop(pfrag, keep);

      // steady state: S(i) and P(i-1) V(i-1) on the tensor cores, then softmax(S(i)) beside P V
      for (int i = 1; i < blk.blocks(); ++i) {
        const uint32_t alibi_next = alibi_word(alibi_left_word, i);
        wait_turn();
        issue_qk(s[0], i, alibi_next);
        issue_pv(o[0], softmax.sum_acc, pfrag, i - 1);
        pass_turn();
        draw_keep(keep, bh, i);
        wgmma_wait<1>();  // S(i) is done, P V may still run
        fence_operand(s[0]);
        release(sm.k_empty(stage_of(i)));
        if (i == blk.blocks() - 1) release(sm.q_empty());  // the producer may load the next Q
        scores_to_p(s, i, p.scale_log2, softmax, correction);
        softmax.rescale(o, correction, [&] {  // P V must be done before o is touched
          wgmma_wait<0>();
          fence_operand(o[0]);
          fence_operand(softmax.sum_acc);
        });
        release(sm.v_empty(stage_of(i - 1)));
        pack_a_fragments<Element>(s[0], pfrag);
        drop(pfrag, keep);
      }

      // epilogue of the loop: the last P V
      wait_turn();
      issue_pv(o[0], softmax.sum_acc, pfrag, blk.blocks() - 1);
      pass_turn();
      wgmma_wait<0>();
      fence_operand(o[0]);
      fence_operand(softmax.sum_acc);
      release(sm.v_empty(stage_of(blk.blocks() - 1)));
    }
    store(p, o, softmax);
  }

  // O / l and lse. The accumulator layout scatters a warp's O over 16 rows in 4-byte pieces; the
  // warp stages them in shared memory and writes whole rows in 16-byte pieces (full sectors).
  __device__ __forceinline__ void store(const FwdParams& p, float (&o)[1][kOTiles][4],
                                        Softmax& softmax) const {
    using Ops = ElementOps<Element>;
    constexpr int kPitch = Traits::kOStagePitch, kCols = Traits::kOStageCols, kChunksPerRow = kCols / 8;
    float row_lse[1][2];
    if constexpr (Mask::kAlibi && !Mask::kCausal) {  // the rows' shift (add_alibi_shifted) out of lse
      float shift_log2[1][2];
      alibi_row_shift_log2(shift_log2, blk.mask, blk.mask.alibi_coef(blk.head), warp_first_row, p.scale_log2);
      softmax.finalize(o, p.scale_log2, row_lse, sink_log2(p, blk.head), shift_log2);
    } else {
      softmax.finalize(o, p.scale_log2, row_lse, sink_log2(p, blk.head));
    }
    if constexpr (Mask::kDropout)
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot)
#pragma unroll
        for (int j = 0; j < 4; ++j) o[0][ot][j] *= blk.mask.dropout_scale;
    Element* stage = sm.o_stage(threadIdx.x / 32 - 4);  // warps 0-3 are the producer's
    Element* out = static_cast<Element*>(p.out) + blk.seq.out_offset(p.out_batch_stride, p.out_row_stride) +
                   blk.head * p.out_head_stride;
#pragma unroll
    for (int col0 = 0; col0 < Traits::kHeadDim; col0 += kCols) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int ot = 0; ot < kCols / 8; ++ot)
          *reinterpret_cast<uint32_t*>(stage + (lane / 4 + 8 * r) * kPitch + ot * 8 + 2 * (lane % 4)) =
              Ops::pack(o[0][col0 / 8 + ot][2 * r], o[0][col0 / 8 + ot][2 * r + 1]);
      __syncwarp();
      // (out is ours, contiguous: its rows are 16-byte aligned.)
#pragma unroll
      for (int k = 0; k < 16 * kChunksPerRow / 32; ++k) {
        const int c = 32 * k + lane, r = c / kChunksPerRow, col = c % kChunksPerRow * 8, row = warp_first_row + r;
        if (row < blk.seq.len_q)
          *reinterpret_cast<uint4*>(out + row * p.out_row_stride + col0 + col) =
              *reinterpret_cast<const uint4*>(stage + r * kPitch + col);
      }
      __syncwarp();  // the next chunk's (or tile's) store rewrites the stage
    }
    float* lse = p.lse + blk.seq.lse_offset(p, blk.head);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_first_row + lane / 4 + 8 * r;
      if (row < blk.seq.len_q && lane % 4 == 0) lse[row] = row_lse[0][r];
    }
  }
};

// kPaged: K and V from a paged cache (FwdParams::block_table).
template <typename Traits, typename Mask, bool kPaged>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    fwd_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ CUtensorMap tma_q,
               const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v) {
#ifdef FAT_SM90_DEVICE
  extern __shared__ char smem_raw[];
  const FwdSmem<Traits> sm(smem_raw);
  const TileGrid tiles(p, Traits::kBlockM);

  if (threadIdx.x == 0) {
    mbar_init(sm.q_full(), 1);
    mbar_init(sm.q_empty(), 4 * Traits::kConsumerWarpgroups);  // one arrival per consumer warp
    for (int s = 0; s < Traits::kStages; ++s) {
      mbar_init(sm.k_full(s), 1);
      mbar_init(sm.v_full(s), 1);
      mbar_init(sm.k_empty(s), 4 * Traits::kConsumerWarpgroups);
      mbar_init(sm.v_empty(s), 4 * Traits::kConsumerWarpgroups);
    }
    for (int s = 0; s < Traits::kTileSlots; ++s) {
      mbar_init(sm.tile_full(s), 1);
      mbar_init(sm.tile_empty(s), 4 * Traits::kConsumerWarpgroups);
    }
    mbar_init_fence();
  }
  static_assert(Traits::kOnesBytes / 4 <= Traits::kThreads, "one word of ones per thread");
  if (threadIdx.x < Traits::kOnesBytes / 4) sm.ones()[threadIdx.x] = ElementOps<typename Traits::Element>::kOnePair;
  if constexpr (Mask::kAlibi) write_alibi_keys(sm);
  fence_proxy_async();  // the ones and ALiBi's keys are written by plain stores and read by wgmma (async proxy)
  __syncthreads();

  RingCounters<Traits::kStages> ring;
  TileQueue<FwdSmem<Traits>, Traits::kTileSlots> queue(sm);
  const int warpgroup = warp_uniform(threadIdx.x / 128);
  if (warpgroup == 0) {
    regs_decrease<Traits::kProducerRegisters>();
    // One thread issues the loads; from a paged cache, the whole warp (produce_paged).
    if (threadIdx.x >= (kPaged ? 32 : 1)) return;
    const int lane = kPaged ? threadIdx.x : 0;
    const auto next_tile = [&] {
      const int next = lane == 0 ? queue.next(p.tile_counter, tiles.count) : 0;
      return kPaged ? __shfl_sync(0xffffffffu, next, 0) : next;
    };
    for (int tile = blockIdx.x;; tile = next_tile()) {
      if (lane == 0) queue.push(tile);
      if (tile >= tiles.count) break;
      const FwdBlock<Traits, Mask> blk(p, tiles, tile);
      if (!blk.has_keys()) continue;
      if constexpr (kPaged)
        produce_paged(blk, p, &tma_q, &tma_k, &tma_v, sm, ring, lane);
      else
        produce(blk, p, &tma_q, &tma_k, &tma_v, sm, ring);
      ring.advance(blk.blocks());
    }
  } else {
    regs_increase<Traits::kConsumerRegisters>();
    if (Traits::kPingPong && warpgroup == Traits::kConsumerWarpgroups)  // the last one gives the first turn
      Barriers::fwd_turn(0).arrive();
    for (int tile = queue.pop(); tile < tiles.count; tile = queue.pop()) {
      const FwdBlock<Traits, Mask> blk(p, tiles, tile);
      if (blk.empty()) continue;
      const Consumer<Traits, Mask> consumer(blk, sm, ring, warpgroup - 1);
      // From a paged cache an idle warpgroup (decode) only keeps in step: measured 8-9% faster.
      // From a contiguous one the same was up to 5% slower at large caches (H200), so it works.
      if (kPaged && consumer.idle()) {
        if (blk.has_keys()) consumer.keep_in_step();
      } else {
        consumer.run(p);
      }
      if (blk.has_keys()) ring.advance(blk.blocks());
    }
  }
#endif
}

}  // namespace fat::sm90
