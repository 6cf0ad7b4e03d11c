// Launch template of the sm80 forward: one instantiation file per (dtype, head dim) includes it.
#pragma once
#include "../launch.h"
#include "fwd_kernel.h"
#include "traits.h"

#ifndef FAT_TENSOR_ROW_SUM
#define FAT_TENSOR_ROW_SUM 1  // row sum l on the tensor cores (P x ones); 0: FP32 adds
#endif

namespace fat::sm80 {

template <typename Traits, typename Mask>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<Traits, Mask>;
  constexpr int smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fat::sm80

namespace fat {

template <typename Element, int HeadDim>
cudaError_t run_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
  using Traits = typename sm80::FwdConfig<Element, HeadDim, FAT_TENSOR_ROW_SUM>::Traits;
  return sm80_variant_switch(
      p, [&](auto variant) { return sm80::launch_fwd<Traits, typename decltype(variant)::type>(p, stream); });
}

}  // namespace fat
