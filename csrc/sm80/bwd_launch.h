// Launch template of the sm80 backward (dsum pre-pass + main kernel).
#pragma once
#include "../launch.h"
#include "bwd_kernel.h"
#include "traits.h"

namespace fat::sm80 {

template <typename Traits, typename Mask>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  auto kernel = bwd_kernel<Traits, Mask>;
  // The sm90 build of the kernel stages dQ in shared memory (kBulkDq): size it by the device,
  // which picks that build.
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  const int smem = major == 9 ? Traits::kSmemBytesBulkDq : Traits::kSmemBytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // Non-deterministic: one CTA per key block, all adding into one dq_accum. Deterministic: the
  // caller chose dq_accum_split_stride's count of splits and passes it as num_splits.
  const int blocks = p.deterministic ? p.num_splits : ceil_div(p.seqlen_k, Traits::kBlockN);
  const dim3 grid(blocks, p.heads_k, p.batch);
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fat::sm80

namespace fat {

template <typename Element, int HeadDim>
cudaError_t run_bwd_dsum(const BwdParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 128 / (HeadDim / 8);
  const dim3 grid(ceil_div(p.seqlen_q, kRowsPerBlock), p.heads, p.batch);
  sm80::dsum_kernel<Element, HeadDim><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int HeadDim>
cudaError_t run_bwd_dq_convert(const BwdParams& p, void* dq, int64_t batch_stride, int64_t row_stride,
                               int64_t head_stride, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 128 / (HeadDim / 8);
  const dim3 grid(ceil_div(p.seqlen_q, kRowsPerBlock), p.heads, p.batch);
  sm80::dq_convert_kernel<Element, HeadDim>
      <<<grid, 128, 0, stream>>>(p, static_cast<Element*>(dq), batch_stride, row_stride, head_stride);
  return cudaGetLastError();
}

template <typename Element, int HeadDim>
cudaError_t run_bwd_sm80(const BwdParams& p, cudaStream_t stream) {
  using Traits = typename sm80::BwdConfig<Element, HeadDim>::Traits;
  // flash_api sizes the deterministic splits by kBwdBlockN keys: never more splits than this
  // kernel's key blocks when those are no longer.
  static_assert(kBwdBlockN % Traits::kBlockN == 0, "flash_api sizes dq_accum splits with kBwdBlockN");
  return sm80_variant_switch(
      p, [&](auto variant) { return sm80::launch_bwd<Traits, typename decltype(variant)::type>(p, stream); });
}

}  // namespace fat
