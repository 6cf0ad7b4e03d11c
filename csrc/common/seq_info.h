// Where one (batch, head) sequence lives: its lengths and the element offsets of its first row,
// for the batched layout and the varlen (cu_seqlens) layout alike.
#pragma once
#include <cstdint>

#include "../params.h"

namespace fat {

struct SeqInfo {
  int len_q, len_k;
  int64_t first_q, first_k;  // varlen: first token of the sequence; batched: 0 (KV cache: leftpad)
  int batch, batch_k;        // batched: the q and the k/v batch row
  int batch_out;             // batched: the out / lse batch row (b; differs from batch under split-KV)
  bool varlen;               // q, out and lse packed (cu_seqlens_q)
  bool varlen_k;             // k and v packed (cu_seqlens_k); with varlen q but not k: a paged prefill

  __device__ __forceinline__ SeqInfo(const FwdParams& p, int b) : batch(b), batch_k(b), batch_out(b) {
    varlen = p.cu_seqlens_q != nullptr;
    varlen_k = p.cu_seqlens_k != nullptr;
    if (varlen) {
      // Offsets clamped into their tensors (they are not checked on the host by default).
      const int end_q = min(max(p.cu_seqlens_q[b + 1], 0), p.rows_q);
      first_q = min(max(p.cu_seqlens_q[b], 0), end_q);
      len_q = end_q - static_cast<int>(first_q);
      if (varlen_k) {
        const int end_k = min(max(p.cu_seqlens_k[b + 1], 0), p.rows_k);
        first_k = min(max(p.cu_seqlens_k[b], 0), end_k);
        len_k = end_k - static_cast<int>(first_k);
      } else {  // k and v batched (paged or gathered pages): sequence b's first seqused_k[b] keys
        first_k = 0;
        len_k = min(max(p.seqused_k[b], 0), p.seqlen_k);
      }
    } else {
      const int splits = max(p.kv_splits, 1), split = b % splits;
      batch = batch_k = b / splits;
      first_q = first_k = 0;
      len_q = p.seqlen_q;
      len_k = p.seqlen_k;
      if (p.kv_batch_idx != nullptr) batch_k = min(max(p.kv_batch_idx[batch], 0), p.batch_k - 1);
      if (p.seqused_k != nullptr) len_k = min(max(p.seqused_k[batch], 0), p.seqlen_k);
      if (p.leftpad_k != nullptr) {
        const int pad = min(max(p.leftpad_k[batch], 0), len_k);
        first_k = pad;
        len_k -= pad;
      }
      if (splits > 1) {  // this split's part of the keys (box-aligned starts when paged, params.h)
        const int begin = split == 0 ? 0 : len_k * split / splits & ~p.split_round_bits;
        const int end = split == splits - 1 ? len_k : len_k * (split + 1) / splits & ~p.split_round_bits;
        first_k += begin;
        len_k = end - begin;
      }
    }
  }
  // Offset of row 0 of a q-shaped (resp. k-shaped) tensor for this sequence.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride) const {
    return varlen ? first_q * row_stride : batch * batch_stride;
  }
  // Offset of row 0 of an out-shaped tensor (the forward's output).
  __device__ __forceinline__ int64_t out_offset(int64_t batch_stride, int64_t row_stride) const {
    return varlen ? first_q * row_stride : batch_out * batch_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride) const {
    return varlen_k ? first_k * row_stride : batch_k * batch_stride + first_k * row_stride;
  }
  // Offset of row 0 in the lse-shaped tensors: (batch, heads, seqlen_q) or (heads, total_q).
  __device__ __forceinline__ int64_t lse_offset(const FwdParams& p, int head) const {
    return (varlen ? first_q : batch_out * p.lse_batch_stride) + head * p.lse_head_stride;
  }
  // Bottom-right aligned causal mask: query row i sees keys j <= i + len_k - len_q.
  __device__ __forceinline__ int causal_shift() const { return len_k - len_q; }
};

__host__ __device__ __forceinline__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace fat
