// Plain parameter structs shared by every kernel. No torch types: kernels never include torch.
#pragma once
#include <cstdint>

namespace fat {

// Forward pass. Strides are in elements. Tensors are (batch, seq, heads, dim) or, for varlen,
// (total_tokens, heads, dim) with cu_seqlens_* giving each sequence's first token.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (batch, heads, seqlen_q), or (heads, total_q) for varlen; natural-log units

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int batch, heads, heads_k, head_dim;
  int seqlen_q, seqlen_k;  // per sequence when batched; the maxima when varlen
  int rows_q, rows_k;      // rows of the q / k tensors: seqlen when batched, total tokens when varlen

  const int* cu_seqlens_q;  // null when batched
  const int* cu_seqlens_k;  // null when batched, and in a paged prefill: varlen q, k and v as below

  // Batched (a KV cache), and the paged prefill (varlen q, seqused_k only): k and v have batch_k
  // rows of seqlen_k keys each; query batch b
  // reads row kv_batch_idx[b] (b when null), keys [leftpad_k[b], seqused_k[b]) of it (from 0, up
  // to seqlen_k, when null). The kernels clamp these values into range: never an access outside
  // the tensors, whatever they hold.
  int batch_k;
  const int* kv_batch_idx;
  const int* seqused_k;
  const int* leftpad_k;
  // Split-KV (batched, forward only; 0 or 1: none): the launch's batch is batch x kv_splits
  // virtual sequences; virtual b reads query batch b / kv_splits and the (b % kv_splits)-th of
  // kv_splits equal parts of that sequence's keys, and writes out / lse at batch row b.
  int kv_splits;
  // Paged KV cache (sm90 forward, batched, no kv_batch_idx / leftpad_k): k and v are pools of
  // batch_k pages of page_size rows (k_batch_stride apart); key j of query batch b sits in row
  // j % page_size of page block_table[b * block_table_stride + j / page_size] (max_pages entries;
  // values clamped into range). The kernel loads a key block as boxes of paged_box_rows() rows,
  // each inside one page; split boundaries are rounded down to multiples of it. Null: not paged.
  const int* block_table;
  int64_t block_table_stride;
  int max_pages, page_size;
  int split_round_bits;  // paged_box_rows() - 1 when paged, else 0: split starts are multiples of the box

  // The attention variant (csrc/common/mask.h): the launchers turn these flags into template
  // parameters (variant_switch). causal: the window (-1, 0); local: any other bounded window
  // [position - window_left, position + window_right], -1 an unbounded edge.
  bool causal, local;
  int window_left, window_right;
  // Softcap (common/mask.h Variant): softcap_scale = softmax_scale / softcap, and scale_log2 is
  // softcap * log2(e) instead of softmax_scale * log2(e).
  bool softcap;
  float softcap_scale;
  // ALiBi (common/mask.h Variant): fp32 slopes (heads,) or (batch, heads) (alibi_batch_stride 0
  // for the former); alibi_scale = log2(e) / scale_log2.
  bool alibi;
  const float* alibi_slopes;
  int64_t alibi_batch_stride;
  float alibi_scale;

  // Dropout (common/mask.h Variant; not in the sm90 backward): a probability is kept when its Philox value
  // (common/philox.h) is below dropout_threshold = round(p_keep x 65536), and the kept ones are
  // scaled by dropout_scale = 1 / p_keep. rng_state: the call's (seed, offset), int64 on the
  // device, written by the host code before the forward (graph-safe) and read by the backward.
  bool dropout;
  uint32_t dropout_threshold;
  float dropout_scale;
  const int64_t* rng_state;

  float softmax_scale;
  float scale_log2;  // softmax_scale * log2(e): the exp2 argument is one FFMA away from the score

  // Attention sinks: fp32 (heads,), a logit per query head (natural-log units, compared with the
  // scaled scores) that joins each row's softmax normaliser and carries no value; null: none.
  // Forward only (the backward takes the sink-normalised out and lse as they are).
  const float* sink;

  int* tile_counter;  // sm90 forward: tiles handed out past the first wave; zero at launch, zero again at exit
};

// Backward pass: the forward's tensors plus the gradients and the fp32 workspaces.
struct BwdParams : FwdParams {
  const void* dout;
  void* dk;
  void* dv;
  // fp32, zero-initialised, (splits, batch, heads, seqlen_q, head_dim) or varlen (splits, heads,
  // total_q, head_dim): the rows of one head are contiguous, so a block of them is one bulk copy.
  // Columns are stored swizzled (dq_accum_col).
  float* dq_accum;
  float* dsum;      // rowsum(dout * out), laid out like lse

  int64_t dout_batch_stride, dout_row_stride, dout_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  int64_t dq_accum_batch_stride, dq_accum_row_stride, dq_accum_head_stride;
  int64_t dq_accum_split_stride;
  int num_splits;  // dq_accum splits (deterministic mode); 1 otherwise

  // Deterministic mode: each CTA of a (batch, kv head) owns one dq_accum split and walks its
  // key blocks in order, so no two CTAs add into the same fp32 slot.
  bool deterministic;
};

// Split-KV's merge (combine/merge_splits.h): out_partial (batch x splits, rows, heads_k, dim) in
// the element type and lse_partial (batch x splits, heads_k, rows) fp32, rows = seqlen_q x group
// packed (query, head in group); out (batch, seqlen_q, heads_k x group, dim) and lse (batch,
// heads_k x group, seqlen_q), all contiguous.
struct MergeParams {
  const void* out_partial;
  const float* lse_partial;
  void* out;
  float* lse;
  int batch, splits, rows, heads_k, group, seqlen_q;
};

// Whether a call combines softcap, ALiBi and dropout (the sm80 kernels' Combined variant,
// common/mask.h).
__host__ __device__ __forceinline__ bool combines_features(const FwdParams& p) {
  return p.softcap + p.alibi + p.dropout > 1;
}

// The sink of query head `head` in log2 units (OnlineSoftmax::finalize), -inf when there is none.
__host__ __device__ __forceinline__ float sink_log2(const FwdParams& p, int head) {
  return p.sink != nullptr ? p.sink[head] * 1.4426950408889634f : -__builtin_huge_valf();
}

// The rows of one TMA box of a paged K/V block: the largest power of two dividing both the page
// size (a multiple of 16) and the 128-key block, so that boxes starting at multiples of it never
// straddle a page (pages of 48 rows: boxes of 16; of 384: 128).
__host__ __device__ __forceinline__ int paged_box_rows(const FwdParams& p) {
  const int low_bit = p.page_size & -p.page_size;
  return low_bit < 128 ? low_bit : 128;
}

// Where column `col` of a dq_accum row lives: its 16-byte chunk index XOR-ed with 2 (row % 8),
// so the backward's fp32 dQ staging stores (4 rows x 4 lanes of 8 bytes per half-warp, rows
// 512 or 256 bytes apart) fall in distinct shared-memory banks while every row stays one
// contiguous run for the bulk copy to global. Pairs of columns (2 c, 2 c + 1) and 8-aligned runs
// of 8 stay together. Needs head_dim >= 64 (kernel head dims are 64 and 128).
__host__ __device__ __forceinline__ constexpr int dq_accum_col(int row, int col) { return col ^ ((row & 7) << 3); }

}  // namespace fat
