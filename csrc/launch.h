// The launchers every instantiation file defines; flash_api.cpp dispatches to them.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/switch.h"
#include "params.h"

namespace fat {

// Element: __half or __nv_bfloat16. Each returns the launch error, if any.
template <typename Element, int HeadDim>
cudaError_t run_fwd_sm80(const FwdParams& params, cudaStream_t stream);

// Hopper (sm_90a build only): TMA + wgmma, warp-specialized.
template <typename Element, int HeadDim>
cudaError_t run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

template <typename Element, int HeadDim>
cudaError_t run_bwd_sm80(const BwdParams& params, cudaStream_t stream);

// Hopper (sm_90a build only): the main backward kernel, TMA + wgmma, warp-specialized.
template <typename Element, int HeadDim>
cudaError_t run_bwd_sm90(const BwdParams& params, cudaStream_t stream);

// The backward's first pass: dsum = rowsum(dout * out) over the head dim; clears dq_accum.
template <typename Element, int HeadDim>
cudaError_t run_bwd_dsum(const BwdParams& params, cudaStream_t stream);

// The backward's last pass: dq = (sum of the dq_accum splits) * softmax_scale, q's dtype.
template <typename Element, int HeadDim>
cudaError_t run_bwd_dq_convert(const BwdParams& params, void* dq, int64_t batch_stride, int64_t row_stride,
                               int64_t head_stride, cudaStream_t stream);

// Split-KV's merge of the splits' partial outputs (combine/merge_splits.h).
template <typename Element, int HeadDim>
cudaError_t run_merge_splits(const MergeParams& params, cudaStream_t stream);

// Key block of the backward kernels (flash_api sizes the deterministic dq_accum splits by it; the
// hd256 sm80 kernel's key block of 64 divides it).
constexpr int kBwdBlockN = 128;

// The head dims with sm90 kernels (csrc/generate_instantiations.py): 64, 128 and 256, both passes
// (the hd256 backward without softcap, ALiBi or dropout: flash_api's use_sm90_kernels).
constexpr bool has_sm90_kernels(int head_dim, bool /*backward*/) { return head_dim <= 128 || head_dim == 256; }

}  // namespace fat
