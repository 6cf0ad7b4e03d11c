// Which tile a CTA of an sm90 kernel works on next.
#pragma once
#include "../params.h"
#include "pipeline.h"

namespace fat::sm90 {

// Persistent kernels: tiles are handed out at run time. Each CTA (one per SM) starts with tile
// blockIdx.x and takes the next one from a global counter whenever its producer is done loading
// one, so an SM that finishes early (short causal tiles, short varlen sequences) takes more. The
// producer passes each index to the consumers through a ring of Slots tile slots in shared memory
// (Smem's tile_full / tile_empty mbarriers and tile_slot words); an index past the last tile tells
// them to stop.
template <typename Smem, int Slots>
struct TileQueue {
  const Smem& sm;
  RingPosition<Slots> at;  // this CTA's tiles so far
  __device__ __forceinline__ explicit TileQueue(const Smem& sm_) : sm(sm_) {}

  // Producer thread: publishes this CTA's next tile.
  __device__ __forceinline__ void push(int tile) {
    at.wait_empty(sm.tile_empty(at.stage()));  // every consumer warp read the slot's last tile
    *sm.tile_slot(at.stage()) = tile;
    mbar_arrive(sm.tile_full(at.stage()));  // releases the store above
    at = at.plus(1);
  }
  // Producer thread: the tile after this CTA's current one. Every CTA that starts with a tile
  // fetches until it gets one past the last, so a launch fetches exactly `count` times and the
  // fetch that returns count - 1 is its last: that one puts the counter back to zero for the next
  // launch on the stream (no memset before each launch).
  __device__ __forceinline__ static int next(int* counter, int count) {
    const int fetched = atomicAdd(counter, 1);
    if (fetched == count - 1) atomicExch(counter, 0);
    return gridDim.x + fetched;
  }

  // Consumer warp: this CTA's next tile.
  __device__ __forceinline__ int pop() {
    at.wait_full(sm.tile_full(at.stage()));
    const int tile = *sm.tile_slot(at.stage());
    warp_release(sm.tile_empty(at.stage()));
    at = at.plus(1);
    return tile;
  }
};

}  // namespace fat::sm90
