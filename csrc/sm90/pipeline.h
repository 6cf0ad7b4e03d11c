// Pieces every sm90 kernel shares between its producer and consumer warps: positions in a
// shared-memory buffer ring on mbarriers, and named barriers with their thread counts.
#pragma once
#include "../common/sm90_ptx.h"

namespace fat::sm90 {

// A position in a ring of Stages buffers that a producer fills (completing a `full` mbarrier per
// slot) and consumers drain (arriving on an `empty` mbarrier per slot). Producer and consumers
// count the same sequence of fills, so each derives the slot and the phase parity from its own
// count: the n-th fill of a slot completes phase n of its `full` barrier, and the producer may
// start that fill once phase n - 1 of its `empty` barrier has completed.
template <int Stages>
struct RingPosition {
  int fills = 0;  // fills of the ring before this one

  __device__ __forceinline__ int stage() const { return fills % Stages; }
  __device__ __forceinline__ int use() const { return fills / Stages; }  // earlier fills of this slot
  __device__ __forceinline__ RingPosition plus(int n) const { return {fills + n}; }

  // Consumer: blocks until this fill has landed.
  __device__ __forceinline__ void wait_full(uint64_t* full) const { mbar_wait(full, use() & 1); }
  // Producer: blocks until the consumers have released the slot's previous fill.
  __device__ __forceinline__ void wait_empty(uint64_t* empty) const {
    if (use() > 0) mbar_wait(empty, empty_parity());
  }
  // The parity of the `empty` phase that released the slot's previous fill (when use() > 0).
  __device__ __forceinline__ int empty_parity() const { return (use() - 1) & 1; }
};

// A consumer warp's release of a buffer it has read: one arrival per warp, after all its lanes.
__device__ __forceinline__ void warp_release(uint64_t* empty) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(empty);
}

// A named barrier (ids 1-15; 0 is __syncthreads) and how many threads meet there.
struct NamedBarrier {
  int id, threads;
  __device__ __forceinline__ void sync() const { named_barrier_sync(id, threads); }
  __device__ __forceinline__ void arrive() const { named_barrier_arrive(id, threads); }
};

// Every named barrier of the sm90 kernels, in one place so that ids never collide.
struct Barriers {
  // Forward, PingPong: consumer warpgroup w (0-2) waits for its turn to issue GEMMs; the barrier
  // meets the waiter and the warpgroup that passes it the turn.
  __device__ __forceinline__ static constexpr NamedBarrier fwd_turn(int warpgroup) { return {1 + warpgroup, 256}; }
  // Backward (hd128): both consumer warpgroups have written their halves of dS^T to shared memory.
  static constexpr NamedBarrier bwd_ds_ready() { return {4, 256}; }
  // Backward dQ kernel (hd256): consumer warpgroup w (0-1) waits for its turn to issue GEMMs, as
  // the forward's fwd_turn.
  __device__ __forceinline__ static constexpr NamedBarrier bwd_dq_turn(int warpgroup) { return {5 + warpgroup, 256}; }
};

}  // namespace fat::sm90
