// Launch template of the sm90 backward main kernel (the dsum pre-pass and the dQ conversion are
// the shared ones of sm80/bwd_launch.h). One instantiation file per (dtype, head dim) includes it.
#pragma once
#include "../launch.h"
#include "bwd_dq.h"
#include "bwd_kernel.h"
#include "bwd_split_dim.h"
#include "tma.h"
#include "traits.h"

namespace fat::sm90 {

template <typename Traits, typename Mask>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  CUtensorMap tma_q, tma_k, tma_v, tma_do;
  cudaError_t err = make_qkv_maps<Element>(p, Traits::kBlockM, Traits::kBlockN, &tma_q, &tma_k, &tma_v);
  if (err == cudaSuccess)  // dO is q-shaped
    err = make_tensor_map<Element>(&tma_do, p.dout, p.head_dim, p.rows_q, p.heads, p.cu_seqlens_q ? 1 : p.batch,
                                   p.dout_row_stride, p.dout_head_stride, p.dout_batch_stride, Traits::kBlockM);
  if (err != cudaSuccess) return err;

  auto kernel = [] {
    if constexpr (Traits::kHeadDim == 256)
      return bwd_kernel_split_dim<Traits, Mask>;
    else
      return bwd_kernel<Traits, Mask>;
  }();
  constexpr int smem = Traits::kSmemBytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // One CTA per (key block, kv head, batch), or per (dq_accum split, kv head, batch) when
  // deterministic (the caller sized num_splits with kBwdBlockN): see for_each_key_block.
  const int kv_heads = p.heads_k * p.batch;
  const int grid = (p.deterministic ? p.num_splits : ceil_div(p.seqlen_k, Traits::kBlockN)) * kv_heads;
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p, tma_q, tma_k, tma_v, tma_do);
  return cudaGetLastError();
}

// The hd256 dQ kernel (bwd_dq.h): one CTA per (query block, q head, batch); varlen: seqlen_q is
// the longest sequence and CTAs past a shorter one's end return at once.
template <typename Traits, typename Mask>
cudaError_t launch_bwd_dq(const BwdParams& p, cudaStream_t stream) {
  using Element = typename Traits::Element;
  CUtensorMap tma_q, tma_k, tma_v, tma_do;
  cudaError_t err = make_qkv_maps<Element>(p, Traits::kBlockM, Traits::kBlockN, &tma_q, &tma_k, &tma_v);
  if (err == cudaSuccess)
    err = make_tensor_map<Element>(&tma_do, p.dout, p.head_dim, p.rows_q, p.heads, p.cu_seqlens_q ? 1 : p.batch,
                                   p.dout_row_stride, p.dout_head_stride, p.dout_batch_stride, Traits::kBlockM);
  if (err != cudaSuccess) return err;
  constexpr int smem = Traits::kSmemBytes;
  err = cudaFuncSetAttribute(bwd_kernel_dq<Traits, Mask>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  bwd_kernel_dq<Traits, Mask><<<grid, Traits::kThreads, smem, stream>>>(p, tma_q, tma_k, tma_v, tma_do);
  return cudaGetLastError();
}

}  // namespace fat::sm90

namespace fat {

// Query rows per step: 128 at hd64 (FA3's choice too), 64 at hd128 (the registers of dK, dV).
// Head dim 256: two kernels, dK and dV (bwd_split_dim.h), then dQ (bwd_dq.h); the masks plain,
// with softcap or with ALiBi (flash_api runs the sm80 kernel for dropout there).
template <typename Element, int HeadDim>
cudaError_t run_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  if constexpr (HeadDim == 256) {
    using Traits = sm90::BwdSplitDimTraits<Element>;
    static_assert(kBwdBlockN % Traits::kBlockN == 0, "flash_api sizes dq_accum splits with kBwdBlockN");
    if (p.dropout) return cudaErrorNotSupported;
    return variant_switch(p, [&](auto variant) {
      using Mask = typename decltype(variant)::type;
      const cudaError_t err = sm90::launch_bwd<Traits, Mask>(p, stream);
      return err == cudaSuccess ? sm90::launch_bwd_dq<sm90::BwdDqTraits<Element>, Mask>(p, stream) : err;
    });
  } else {
    using Traits = sm90::BwdTraits<Element, HeadDim, HeadDim == 64 ? 128 : 64>;
    static_assert(Traits::kBlockN == kBwdBlockN, "flash_api sizes dq_accum splits with kBwdBlockN");
    return variant_switch_with_dropout(
        p, [&](auto variant) { return sm90::launch_bwd<Traits, typename decltype(variant)::type>(p, stream); });
  }
}

}  // namespace fat
