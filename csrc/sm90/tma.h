// Host side of TMA: tensor maps over the (batch, seq, heads, dim) tensors, built for each call
// and passed to the kernels by value (__grid_constant__).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <type_traits>

#include "../params.h"

namespace fat::sm90 {

// cuTensorMapEncodeTiled from the driver, looked up once through the runtime (no -lcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A 4-d map over (head dim, rows, heads, batch) of a (batch, seq, heads, dim) tensor, or of a
// varlen (total, heads, dim) one with batch 1. Boxes of 64 columns (one 128-byte swizzle atom)
// x box_rows rows; rows past the tensor's end read as zeros.
template <typename Element>
cudaError_t make_tensor_map(CUtensorMap* map, const void* data, int head_dim, int rows, int heads, int batch,
                            int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  constexpr auto dtype =
      std::is_same_v<Element, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // A dim of extent 1 may carry any stride (and the caller's checks allow that); TMA wants every
  // stride a positive multiple of 16 bytes, which it never uses for such a dim.
  auto stride_bytes = [](int extent, int64_t stride) {
    return static_cast<cuuint64_t>(extent <= 1 ? 128 : stride * static_cast<int64_t>(sizeof(Element)));
  };
  const cuuint64_t strides[3] = {stride_bytes(rows, row_stride), stride_bytes(heads, head_stride),
                                 stride_bytes(batch, batch_stride)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, dtype, 4, const_cast<void*>(data), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The maps of one call's q (boxes of box_m rows), k and v (box_n rows; from a paged cache, maps
// over (dim, page rows, heads, pages) with boxes of paged_box_rows() rows).
template <typename Element>
cudaError_t make_qkv_maps(const FwdParams& p, int box_m, int box_n, CUtensorMap* q, CUtensorMap* k, CUtensorMap* v) {
  // varlen: (total, heads, dim); a paged prefill has varlen q and batched (paged) k, v
  const int batch = p.cu_seqlens_q != nullptr ? 1 : p.batch, batch_k = p.cu_seqlens_k != nullptr ? 1 : p.batch_k;
  if (p.block_table != nullptr) box_n = paged_box_rows(p);
  cudaError_t err = make_tensor_map<Element>(q, p.q, p.head_dim, p.rows_q, p.heads, batch, p.q_row_stride,
                                             p.q_head_stride, p.q_batch_stride, box_m);
  if (err == cudaSuccess)
    err = make_tensor_map<Element>(k, p.k, p.head_dim, p.rows_k, p.heads_k, batch_k, p.k_row_stride,
                                   p.k_head_stride, p.k_batch_stride, box_n);
  if (err == cudaSuccess)
    err = make_tensor_map<Element>(v, p.v, p.head_dim, p.rows_k, p.heads_k, batch_k, p.v_row_stride,
                                   p.v_head_stride, p.v_batch_stride, box_n);
  return err;
}

// SM count of the current device (persistent grids are sized by it).
inline cudaError_t multiprocessor_count(int* sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  return err == cudaSuccess ? cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device) : err;
}

}  // namespace fat::sm90
