// Thin wrappers over the Hopper (sm_90a) PTX the sm90 kernels use: mbarriers, TMA tensor
// loads, wgmma and setmaxnreg. Everything here compiles to nothing outside the sm_90a pass
// (FAT_SM90_DEVICE), so the sm90 kernel templates can be instantiated in every pass.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "ptx.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FAT_SM90_DEVICE 1
#endif

namespace fat::sm90 {

// ---- mbarriers (shared-memory barriers with a phase bit and a transaction byte count)
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
#ifdef FAT_SM90_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#endif
}
// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void mbar_init_fence() {
#ifdef FAT_SM90_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef FAT_SM90_DEVICE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// Arrives and announces `bytes` more to come by TMA before the phase can complete.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef FAT_SM90_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Blocks until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
#ifdef FAT_SM90_DEVICE
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}

// ---- TMA: a 4-d box (dim, row, head, batch) of a tensor map into shared memory, completing
// on `bar` with the box's byte count.
__device__ __forceinline__ void tma_load_4d(void* dst, const void* tensor_map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
#ifdef FAT_SM90_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
#endif
}

// ---- named barriers (ids 1-15; 0 is __syncthreads): a subset of the CTA's warps meets
// without stopping the others. sync waits for `threads` arrivals including its own; arrive only
// counts itself in and goes on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
#ifdef FAT_SM90_DEVICE
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
#ifdef FAT_SM90_DEVICE
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}

// ---- register reallocation between warpgroups
template <int Registers>
__device__ __forceinline__ void regs_increase() {
#ifdef FAT_SM90_DEVICE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
#endif
}
template <int Registers>
__device__ __forceinline__ void regs_decrease() {
#ifdef FAT_SM90_DEVICE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
#endif
}

// ---- wgmma
// Shared-memory matrix descriptor: start address, leading / stride byte offsets (all >> 4) and
// the swizzle mode (128-byte or none). Tiles are 1024-byte aligned, so the base offset field is 0.
// Kept as two 32-bit words so that moving along a tile is one 32-bit add on the low word: shared
// addresses are below 2^18, so the address field (bits 0-13) never carries into the leading
// offset above it. (Rebuilding the whole descriptor for every wgmma cost five dependent uniform
// instructions in front of each one, delaying the issue of every GEMM.)
// A value every lane of the warp holds, broadcast from lane 0 so the compiler knows it is
// warp-uniform: what derives from it (a warpgroup's wgmma descriptors) then lives in uniform
// registers instead of being kept per thread (which cost the backward's consumers spills).
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffff, x, 0); }

struct SmemDesc {
  uint32_t lo, hi;
  __device__ __forceinline__ SmemDesc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes, bool swizzle_128b)
      : lo(addr >> 4 | (lead_bytes >> 4) << 16), hi(stride_bytes >> 4 | (swizzle_128b ? 1u : 0u) << 30) {}
  // The descriptor of the same layout starting `bytes` (a multiple of 16) further.
  __device__ __forceinline__ uint64_t at(uint32_t bytes) const {
    return static_cast<uint64_t>(hi) << 32 | (lo + (bytes >> 4));
  }
};
__device__ __forceinline__ void wgmma_fence() {
#ifdef FAT_SM90_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FAT_SM90_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FAT_SM90_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}
// Keeps the compiler from moving accesses of an accumulator across the async MMAs that own it.
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}

// The same for a register that a wgmma will read: pins its computation above this point (ahead of
// wgmma_fence, so ptxas need not serialise the batch: C7519).
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// wgmma.mma_async m64nNk16, fp32 accumulators. D is a warpgroup accumulator: warp w holds rows
// 16 w .. 16 w + 15 in the m16n8 layout, d[j] is its 8-column tile j. accumulate == 0 overwrites D.
// Operand sources and layouts:
//   wgmma_ss: A (64 x 16) and B (16 x N) from shared memory through descriptors;
//   wgmma_rs: A from registers (the m16n8k16 A-fragment layout, per warp its 16 rows), B from
//             shared memory.
// Trans = false: the operand is K-major (its K elements contiguous: rows of Q, K, V as stored);
// Trans = true: M- (A) or N-major (B), e.g. V as B of P V, or dS^T stored row-major as A of dS K.
// (Only 16-bit inputs may be transposed.) The accumulator operand lists below are spelled out
// per N because inline asm takes no computed operand lists.
#define FAT_WGMMA_ACC8(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define FAT_WGMMA_ACC_N8 FAT_WGMMA_ACC8(0)
#define FAT_WGMMA_ACC_N32 FAT_WGMMA_ACC8(0), FAT_WGMMA_ACC8(1), FAT_WGMMA_ACC8(2), FAT_WGMMA_ACC8(3)
#define FAT_WGMMA_ACC_N64                                                                                      \
  FAT_WGMMA_ACC8(0), FAT_WGMMA_ACC8(1), FAT_WGMMA_ACC8(2), FAT_WGMMA_ACC8(3), FAT_WGMMA_ACC8(4), FAT_WGMMA_ACC8(5), \
      FAT_WGMMA_ACC8(6), FAT_WGMMA_ACC8(7)
#define FAT_WGMMA_ACC_N128                                                                                    \
  FAT_WGMMA_ACC_N64, FAT_WGMMA_ACC8(8), FAT_WGMMA_ACC8(9), FAT_WGMMA_ACC8(10), FAT_WGMMA_ACC8(11),              \
      FAT_WGMMA_ACC8(12), FAT_WGMMA_ACC8(13), FAT_WGMMA_ACC8(14), FAT_WGMMA_ACC8(15)
#define FAT_WGMMA_REGS_N8 "{%0, %1, %2, %3}"
#define FAT_WGMMA_REGS_N32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FAT_WGMMA_REGS_N64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FAT_WGMMA_REGS_N128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// After the N/2 accumulators come the inputs, numbered from FIRST (a string): ss takes desc_a,
// desc_b, accumulate, trans_a, trans_b; rs takes a[0..3], desc_b, accumulate, trans_b.
#define FAT_WGMMA_SS(N, TYPE, I0, I1, I2, I3, I4)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" I2 ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE \
               "." TYPE " " FAT_WGMMA_REGS_N##N ", %" I0 ", %" I1 ", p, 1, 1, %" I3 ", %" I4 ";\n}\n"         \
               : FAT_WGMMA_ACC_N##N                                                                           \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(int{TransA}), "n"(int{TransB}))
#define FAT_WGMMA_RS(N, TYPE, I0, I1, I2, I3, I4, I5, I6)                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" I5 ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE \
               "." TYPE " " FAT_WGMMA_REGS_N##N ", {%" I0 ", %" I1 ", %" I2 ", %" I3 "}, %" I4 ", p, 1, 1, %" I6   \
               ";\n}\n"                                                                                       \
               : FAT_WGMMA_ACC_N##N                                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(int{TransB}))

template <typename Element>
constexpr bool kIsBf16 = std::is_same_v<Element, __nv_bfloat16>;

template <typename Element, int N, bool TransA = false, bool TransB = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss: N of 32, 64 or 128");
#ifdef FAT_SM90_DEVICE
  if constexpr (N == 32) {
    if constexpr (kIsBf16<Element>) FAT_WGMMA_SS(32, "bf16", "16", "17", "18", "19", "20");
    else FAT_WGMMA_SS(32, "f16", "16", "17", "18", "19", "20");
  } else if constexpr (N == 64) {
    if constexpr (kIsBf16<Element>) FAT_WGMMA_SS(64, "bf16", "32", "33", "34", "35", "36");
    else FAT_WGMMA_SS(64, "f16", "32", "33", "34", "35", "36");
  } else {
    if constexpr (kIsBf16<Element>) FAT_WGMMA_SS(128, "bf16", "64", "65", "66", "67", "68");
    else FAT_WGMMA_SS(128, "f16", "64", "65", "66", "67", "68");
  }
#endif
}

template <typename Element, int N, bool TransB = true>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
  static_assert(N == 8 || N == 64 || N == 128, "wgmma_rs: N of 8, 64 or 128");
#ifdef FAT_SM90_DEVICE
  if constexpr (N == 8) {
    if constexpr (kIsBf16<Element>) FAT_WGMMA_RS(8, "bf16", "4", "5", "6", "7", "8", "9", "10");
    else FAT_WGMMA_RS(8, "f16", "4", "5", "6", "7", "8", "9", "10");
  } else if constexpr (N == 64) {
    if constexpr (kIsBf16<Element>) FAT_WGMMA_RS(64, "bf16", "32", "33", "34", "35", "36", "37", "38");
    else FAT_WGMMA_RS(64, "f16", "32", "33", "34", "35", "36", "37", "38");
  } else {
    if constexpr (kIsBf16<Element>) FAT_WGMMA_RS(128, "bf16", "64", "65", "66", "67", "68", "69", "70");
    else FAT_WGMMA_RS(128, "f16", "64", "65", "66", "67", "68", "69", "70");
  }
#endif
}

}  // namespace fat::sm90
