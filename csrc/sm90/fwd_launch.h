// Launch template of the sm90 forward: the TMA tensor maps, built on the host for each call and
// passed by value, then the kernel. One instantiation file per (dtype, head dim) includes it.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <type_traits>

#include "../launch.h"
#include "fwd_kernel.h"
#include "tma.h"
#include "traits.h"

// Build switches of the FA-T techniques (setup.py sets them from FLASH_ATTN_T_* variables).
// The tensor row sum is off by default here, unlike on the sm80 path: as its own 64x8 wgmma it
// measured neutral at hd64 and 3-4% slower at hd128 than the FP32 adds it replaces
// (benchmarks/NOTES.md).
// Consumer warpgroups of the hd64 kernels: 3 (BlockM 192) measured 3-19% faster than 2
// (benchmarks/NOTES.md). hd128 always has 2: O and S need the registers.
#ifndef FAT_SM90_HD64_WARPGROUPS
#define FAT_SM90_HD64_WARPGROUPS 3
#endif
#ifndef FAT_SM90_TENSOR_ROW_SUM
#define FAT_SM90_TENSOR_ROW_SUM 0
#endif
#ifndef FAT_LAZY_RESCALE
#define FAT_LAZY_RESCALE 1
#endif
#ifndef FAT_PINGPONG
#define FAT_PINGPONG 1
#endif
#ifndef FAT_TIMING_SKIP_SOFTMAX
#define FAT_TIMING_SKIP_SOFTMAX 0
#endif
// Softcap forward: 1 of every 4 score tiles takes exp2 from the FP32 pipe, beside the tanh and
// exp2 the others put on MUFU; 0, 2 and 3 measured slower (benchmarks/NOTES.md).
#ifndef FAT_POLY_EXP2_SOFTCAP
#define FAT_POLY_EXP2_SOFTCAP 1
#endif

namespace fat::sm90 {

template <typename Traits, typename Mask, bool kPaged>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  CUtensorMap tma_q, tma_k, tma_v;
  cudaError_t err = make_qkv_maps<Element>(p, Traits::kBlockM, Traits::kBlockN, &tma_q, &tma_k, &tma_v);
  if (err != cudaSuccess) return err;

  auto kernel = fwd_kernel<Traits, Mask, kPaged>;
  constexpr int smem = Traits::kSmemBytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // Persistent: one CTA per SM (its shared memory and registers allow no second one), taking
  // tiles from the kernel's run-time queue. (A static stride over the tiles measured 3-5% slower
  // under causal, whose tiles differ in length: benchmarks/NOTES.md.)
  int sms = 0;
  err = multiprocessor_count(&sms);
  if (err != cudaSuccess) return err;
  const int grid = std::min(ceil_div(p.seqlen_q, Traits::kBlockM) * p.heads * p.batch, sms);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p, tma_q, tma_k, tma_v);
  return cudaGetLastError();
}

}  // namespace fat::sm90

namespace fat {

template <typename Element, int HeadDim>
cudaError_t run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  constexpr int warpgroups = HeadDim == 64 ? FAT_SM90_HD64_WARPGROUPS : 2;
  using Traits = sm90::FwdTraits<Element, HeadDim, warpgroups, FAT_SM90_TENSOR_ROW_SUM, FAT_LAZY_RESCALE,
                                  FAT_PINGPONG, FAT_POLY_EXP2_SOFTCAP, FAT_TIMING_SKIP_SOFTMAX>;
  // A paged cache: built for the mask variants alone, and for key blocks of 128 (a page's TMA box
  // has up to 128 rows); flash_api gathers the pages for the others (reads_pages_in_place).
  if (p.block_table != nullptr) {
    if constexpr (Traits::kBlockN < 128) {
      return cudaErrorNotSupported;
    } else {
      if (p.softcap || p.alibi) return cudaErrorNotSupported;
      return mask_switch<false, false>(
          p, [&](auto variant) { return sm90::launch_fwd<Traits, typename decltype(variant)::type, true>(p, stream); });
    }
  }
  return variant_switch_with_dropout(
      p, [&](auto variant) { return sm90::launch_fwd<Traits, typename decltype(variant)::type, false>(p, stream); });
}

}  // namespace fat
