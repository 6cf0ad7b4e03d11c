// The only translation unit that includes torch: checks arguments, allocates outputs, fills the
// Params structs, dispatches on (dtype, head dim) and registers the ops with torch.library.
// The Python layer (flash_attn_t/interface.py) checks the same rules first, with the argument
// names of the public API; the checks here guard direct torch.ops calls.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>

#include "launch.h"

namespace fat {
namespace {

constexpr int kSupportedHeadDims[] = {64, 128, 256};

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "flash_attn_t: launching the ", what, " kernel failed: ",
              cudaGetErrorString(err));
}

void check_tensor(const at::Tensor& t, const char* name, int64_t rank, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "flash_attn_t: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == rank, "flash_attn_t: ", name, " must have ", rank, " dimensions, got ", t.dim());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flash_attn_t: ", name, " must have q's dtype");
  TORCH_CHECK(t.device() == q.device(), "flash_attn_t: ", name, " must be on q's device");
  TORCH_CHECK(t.stride(-1) == 1 || t.numel() == 0, "flash_attn_t: ", name,
              " must have a contiguous last dimension");
  // Offsets inside a tile (at most 256 rows) are 32-bit in the kernels (see load_tile_async).
  TORCH_CHECK(t.stride(-3) < (int64_t{1} << 31) / 256, "flash_attn_t: ", name,
              " has a sequence stride too large for the kernels");
}

void check_q(const at::Tensor& q, int64_t rank) {
  check_tensor(q, "q", rank, q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "flash_attn_t: q must be float16 or bfloat16");
  const int64_t d = q.size(-1);
  bool ok = false;
  for (int s : kSupportedHeadDims) ok = ok || d == s;
  TORCH_CHECK(ok, "flash_attn_t: head dim ", d, " is not supported (supported: 64, 128, 256)");
}

// cp.async moves 16-byte chunks: the base and every stride but the last must be multiples of
// 8 elements. A tensor that is not (e.g. a view at an odd offset) is copied once.
at::Tensor aligned(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.size(i) <= 1 || t.stride(i) % 8 == 0);
  return ok ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

// (batch, seq, heads, dim) or, varlen, (tokens, heads, dim): batch, row and head strides.
void strides_of(const at::Tensor& t, int64_t& batch, int64_t& row, int64_t& head) {
  const bool varlen = t.dim() == 3;
  batch = varlen ? 0 : t.stride(0);
  row = t.stride(varlen ? 0 : 1);
  head = t.stride(varlen ? 1 : 2);
}

void fill_fwd(FwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, double softmax_scale) {
  const bool varlen = q.dim() == 3;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  strides_of(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides_of(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides_of(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides_of(out, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(varlen ? 0 : 1);
  p.heads = static_cast<int>(q.size(-2));
  p.heads_k = static_cast<int>(k.size(-2));
  p.head_dim = static_cast<int>(q.size(-1));
  p.rows_q = static_cast<int>(q.size(-3));
  p.rows_k = static_cast<int>(k.size(-3));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
}

// k and v (kv_rank dimensions) against q: same shape, q's head dim, heads dividing q's.
void check_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kv_rank) {
  check_tensor(k, "k", kv_rank, q);
  check_tensor(v, "v", kv_rank, q);
  TORCH_CHECK(k.sizes() == v.sizes(), "flash_attn_t: k and v must have the same shape");
  TORCH_CHECK(k.size(-1) == q.size(-1), "flash_attn_t: k must have q's head dim");
  TORCH_CHECK(k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0,
              "flash_attn_t: q's head count must be a multiple of k's");
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank) {
  check_q(q, rank);
  check_kv(q, k, v, rank);
  if (rank == 4) TORCH_CHECK(k.size(0) == q.size(0), "flash_attn_t: k must have q's batch size");
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.is_cuda() && cu.device() == q.device(), "flash_attn_t: ", name, " must be on q's device");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "flash_attn_t: ", name, " must be int32");
  TORCH_CHECK(cu.dim() == 1 && cu.is_contiguous() && cu.numel() >= 1,
              "flash_attn_t: ", name, " must be a contiguous 1-D tensor of batch + 1 offsets");
}

// Calls f(element_tag, head_dim_constant) for the runtime dtype and head dim.
template <typename F>
cudaError_t dispatch(at::ScalarType dtype, int head_dim, F&& f) {
  auto by_dim = [&](auto element) -> cudaError_t {
    switch (head_dim) {
      case 64: return f(element, std::integral_constant<int, 64>{});
      case 128: return f(element, std::integral_constant<int, 128>{});
      case 256: return f(element, std::integral_constant<int, 256>{});
    }
    TORCH_CHECK(false, "flash_attn_t: head dim ", head_dim, " is not supported");
  };
  return dtype == at::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

// The kernels for this call: the sm90 ones (TMA + wgmma, forward and backward) on Hopper when the
// build has sm_90a, unless FLASH_ATTN_T_FORCE_SM80=1 asks for the portable sm80 ones (to compare),
// or a tensor has no rows (a TMA map cannot describe it; such all-empty cases take the sm80 ones).
bool sm90_kernels_available() {
#ifdef FAT_SM90
  const char* force = std::getenv("FLASH_ATTN_T_FORCE_SM80");
  if (force != nullptr && std::string(force) == "1") return false;
  int device = 0, major = 0;  // the current device is q's (callers hold a device guard)
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess,
              "flash_attn_t: cannot query the GPU's compute capability");
  return major == 9;
#else
  return false;
#endif
}

// Combinations of softcap, ALiBi and dropout run on the sm80 kernels (their Combined variant) in
// both passes; so does dropout in the head dim 256 backward (its sm90 kernels have none).
bool use_sm90_kernels(const FwdParams& p, bool backward = false) {
  return p.rows_q > 0 && p.rows_k > 0 && has_sm90_kernels(p.head_dim, backward) && !combines_features(p) &&
         !(backward && p.head_dim == 256 && p.dropout) && sm90_kernels_available();
}

// The attention variant an op asks for: causal, and flash_attn's window_size (left, right).
struct Variant {
  bool causal;
  int64_t window_left, window_right;
  double softcap;  // 0: none
  const std::optional<at::Tensor>& alibi_slopes;
  double dropout_p = 0.0;
  const int64_t* rng_state = nullptr;  // dropout's (seed, offset) on the device (draw_rng_state)
};

// rng_state: int64 (2,) on q's device, contiguous (the dropout ops' (seed, offset) tensor).
void check_rng_state(const std::optional<at::Tensor>& rng_state, const at::Tensor& q) {
  TORCH_CHECK(rng_state.has_value() && rng_state->is_cuda() && rng_state->device() == q.device() &&
                  rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 && rng_state->is_contiguous(),
              "flash_attn_t: dropout_p > 0 needs rng_state, a contiguous int64 tensor of 2 elements on q's device");
}

// Dropout's random numbers for one forward call: the (seed, offset) of torch's CUDA generator for
// q's device, which advances by one Philox draw per call (as torch's own fused attention does),
// written into rng_state on the stream. Under CUDA-graph capture the generator hands out device
// pointers that each replay refreshes, so the copies below are captured and every replay draws a
// new mask; the kernels and the backward read rng_state, never host values.
void draw_rng_state(at::Tensor& rng_state) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(rng_state.get_device()));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);  // offsets in steps of 4: the generator's granularity
  }
  at::Tensor seed = rng_state.narrow(0, 0, 1), offset = rng_state.narrow(0, 1, 1);
  if (philox.captured_) {
    const at::TensorOptions options = rng_state.options();
    seed.copy_(at::from_blob(philox.seed_.ptr, {1}, options));
    offset.copy_(at::from_blob(philox.offset_.ptr, {1}, options) + static_cast<int64_t>(philox.offset_intragraph_));
  } else {
    seed.fill_(static_cast<int64_t>(philox.seed_.val));
    offset.fill_(static_cast<int64_t>(philox.offset_.val));
  }
}

// alibi_slopes: fp32 (heads,) or (batch, heads), contiguous, on the device of the launch (p.batch
// and p.kv_splits set: the slopes' batch is the query batch).
void set_alibi(FwdParams& p, const std::optional<at::Tensor>& slopes) {
  p.alibi = slopes.has_value();
  if (!p.alibi) return;
  const int64_t batch = p.batch / std::max(p.kv_splits, 1);
  TORCH_CHECK(slopes->is_cuda() && slopes->scalar_type() == at::kFloat && slopes->is_contiguous() &&
                  ((slopes->dim() == 1 && slopes->size(0) == p.heads) ||
                   (slopes->dim() == 2 && slopes->size(0) == batch && slopes->size(1) == p.heads)),
              "flash_attn_t: alibi_slopes must be a contiguous float32 CUDA tensor of shape (nheads,) = (", p.heads,
              ",) or (batch, nheads) = (", batch, ", ", p.heads, ")");
  p.alibi_slopes = slopes->data_ptr<float>();
  p.alibi_batch_stride = slopes->dim() == 2 ? p.heads : 0;
  p.alibi_scale = static_cast<float>(M_LOG2E / p.scale_log2);
}

// Into p, with flash_attn's conventions (p.seqlen_q, p.seqlen_k set): an edge that reaches past
// every row's keys is unbounded (-1); causal is the window (-1, 0), so a causal call with a left
// edge is local with right = 0, and a non-causal (-1, 0) window is causal.
void set_variant(FwdParams& p, const Variant& v) {
  TORCH_CHECK(v.window_left >= -1 && v.window_right >= -1, "flash_attn_t: window_size entries must be >= -1, got (",
              v.window_left, ", ", v.window_right, ")");
  // An edge that lets every row reach past its sequence's keys is unbounded: left >= len_k - 1 or
  // right >= len_q - 1 (row + len_k - len_q + right >= len_k - 1 for every row). flash_attn drops
  // right >= seqlen_k instead, which changes the answer when seqlen_q > seqlen_k; we keep the
  // documented window.
  int64_t left = v.window_left >= p.seqlen_k ? -1 : v.window_left;
  int64_t right = v.causal ? 0 : v.window_right >= p.seqlen_q ? -1 : v.window_right;
  p.causal = left < 0 && right == 0;
  p.local = !p.causal && (left >= 0 || right >= 0);
  p.window_left = static_cast<int>(left);
  p.window_right = static_cast<int>(right);
  TORCH_CHECK(v.softcap >= 0 && std::isfinite(v.softcap), "flash_attn_t: softcap must be a finite number >= 0, got ",
              v.softcap);
  p.softcap = v.softcap > 0;
  if (p.softcap) {  // the softmax runs on tanh(x / softcap), in units of softcap (common/mask.h)
    p.softcap_scale = static_cast<float>(p.softmax_scale / v.softcap);
    p.scale_log2 = static_cast<float>(v.softcap * M_LOG2E);
  }
  set_alibi(p, v.alibi_slopes);
  TORCH_CHECK(v.dropout_p >= 0 && v.dropout_p < 1, "flash_attn_t: dropout_p must be in [0, 1), got ", v.dropout_p);
  p.dropout = v.dropout_p > 0;
  p.dropout_scale = 1.f;
  if (p.dropout) {
    TORCH_CHECK(v.rng_state != nullptr, "flash_attn_t: dropout_p > 0 needs rng_state");
    const double keep = 1.0 - v.dropout_p;  // kept below round(keep x 2^16) of 16-bit draws (common/philox.h)
    p.dropout_threshold = static_cast<uint32_t>(std::min(65536.0, std::nearbyint(keep * 65536.0)));
    p.dropout_scale = static_cast<float>(1.0 / keep);
    p.rng_state = v.rng_state;
  }
}

// learnable_sink: fp32 (heads,) on q's device (the Python layer converts), or none.
void set_sink(FwdParams& p, const std::optional<at::Tensor>& sink, const at::Tensor& q) {
  p.sink = nullptr;
  if (!sink.has_value()) return;
  TORCH_CHECK(sink->is_cuda() && sink->device() == q.device(), "flash_attn_t: learnable_sink must be on q's device");
  TORCH_CHECK(sink->scalar_type() == at::kFloat && sink->dim() == 1 && sink->is_contiguous() &&
                  sink->size(0) == q.size(-2),
              "flash_attn_t: learnable_sink must be a contiguous float32 tensor of shape (nheads,) = (", q.size(-2),
              ",)");
  p.sink = sink->data_ptr<float>();
}

// The sm90 forward's tile counter for a launch on the current device and `stream`: it must read
// zero when the launch starts, and the kernel leaves it at zero when it ends (TileQueue::next).
// One counter per (device, stream), zeroed once and kept, so launches on one stream take turns
// with it and launches on different streams never share one. The kept counters come from
// cudaMalloc, not the caching allocator: an allocation that outlives the call must not land in a
// CUDA-graph memory pool (torch.compile's cudagraph trees run their warmup inside one and reject
// live allocations they do not own). A call being captured gets a counter of its own in `owner`,
// which the graph zeroes on each replay.
int* tile_counter(const at::Tensor& q, cudaStream_t stream, at::Tensor& owner) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TORCH_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess, "flash_attn_t: cannot query the stream");
  if (capture != cudaStreamCaptureStatusNone) {
    owner = at::zeros({1}, q.options().dtype(at::kInt));
    return owner.data_ptr<int>();
  }
  static std::mutex mutex;
  // (never freed: one int per stream, and freeing at interpreter exit may find the driver gone)
  static auto* counters = new std::unordered_map<uint64_t, int*>();
  const uint64_t key = (static_cast<uint64_t>(q.get_device()) << 56) ^ reinterpret_cast<uintptr_t>(stream);
  std::lock_guard<std::mutex> lock(mutex);
  auto found = counters->find(key);
  if (found != counters->end()) return found->second;
  int* counter = nullptr;
  TORCH_CHECK(cudaMalloc(&counter, sizeof(int)) == cudaSuccess &&
                  cudaMemsetAsync(counter, 0, sizeof(int), stream) == cudaSuccess,
              "flash_attn_t: cannot allocate the forward's tile counter: ", cudaGetErrorString(cudaGetLastError()));
  return counters->emplace(key, counter).first->second;
}

void launch_fwd(FwdParams& p, const at::Tensor& q, const Variant& variant) {
  set_variant(p, variant);
  if (p.batch == 0 || p.seqlen_q == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool sm90 = use_sm90_kernels(p);
  at::Tensor counter_owner;  // set only under graph capture; keeps that counter alive until queued
  p.tile_counter = sm90 ? tile_counter(q, stream, counter_owner) : nullptr;
  const at::ScalarType dtype = q.scalar_type();
  check_launch(dispatch(dtype, p.head_dim,
                        [&](auto element, auto dim) {
                          using Element = decltype(element);
                          constexpr int kDim = decltype(dim)::value;
                          if constexpr (has_sm90_kernels(kDim, /*backward=*/false))
                            if (sm90) return run_fwd_sm90<Element, kDim>(p, stream);
                          return run_fwd_sm80<Element, kDim>(p, stream);
                        }),
               "forward");
}

// The batched forward once the arguments are checked: outputs, Params, launch. set_cache fills
// the KV-cache fields (fwd_kvcache) before the launch. kv_splits > 1 (split-KV): out and lse get
// batch x kv_splits rows, one per (sequence, split) (see params.h).
template <typename SetCache>
std::tuple<at::Tensor, at::Tensor> batched_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                               double softmax_scale, const Variant& variant,
                                               const std::optional<at::Tensor>& sink, SetCache&& set_cache,
                                               int64_t kv_splits = 1) {
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_);
  const int64_t b = q.size(0) * kv_splits, sq = q.size(1), h = q.size(2);
  at::Tensor out = at::empty({b, sq, h, q.size(3)}, q.options());
  at::Tensor lse = at::empty({b, h, sq}, q.options().dtype(at::kFloat));
  FwdParams p{};
  fill_fwd(p, q, k, v, out, lse, softmax_scale);
  p.batch = static_cast<int>(b);
  p.kv_splits = static_cast<int>(kv_splits);
  p.batch_k = static_cast<int>(k.size(0));
  p.seqlen_q = static_cast<int>(sq);
  p.seqlen_k = static_cast<int>(k.size(1));
  set_sink(p, sink, q);
  set_cache(p);
  launch_fwd(p, q, variant);
  return {out, lse};
}

// A forward's dropout: with dropout_p > 0, rng_state checked and this call's (seed, offset) drawn
// into it (the caller holds q's device guard); the pointer the kernels read, or null.
const int64_t* forward_rng_state(double dropout_p, const std::optional<at::Tensor>& rng_state, const at::Tensor& q) {
  if (dropout_p <= 0) return nullptr;
  check_rng_state(rng_state, q);
  at::Tensor state = *rng_state;
  draw_rng_state(state);
  return state.data_ptr<int64_t>();
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                                       double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& learnable_sink, double dropout_p,
                                       const std::optional<at::Tensor>& rng_state) {
  check_qkv(q, k, v, 4);
  const c10::cuda::CUDAGuard guard(q.device());
  const Variant variant{causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                        forward_rng_state(dropout_p, rng_state, q)};
  return batched_fwd(q, k, v, softmax_scale, variant, learnable_sink, [](FwdParams&) {});
}

void check_batch_index(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& q) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->device() == q.device(), "flash_attn_t: ", name, " must be on q's device");
  TORCH_CHECK(t->scalar_type() == at::kInt, "flash_attn_t: ", name, " must be int32");
  TORCH_CHECK(t->dim() == 1 && t->is_contiguous() && t->size(0) == q.size(0), "flash_attn_t: ", name,
              " must be a contiguous 1-D tensor of q's batch size");
}

// A paged K/V: block_table int32 (batch, max_pages) on q's device with contiguous rows; k (a pool
// of pages (num_pages, page_size, heads_k, dim), checked as a tensor by the caller) has pages and
// a page size that is a multiple of 16.
void check_paged_kv(const at::Tensor& block_table, const at::Tensor& k, const at::Tensor& q, int64_t batch) {
  TORCH_CHECK(block_table.is_cuda() && block_table.device() == q.device() &&
                  block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == batch &&
                  block_table.size(1) > 0 && block_table.stride(1) == 1,
              "flash_attn_t: block_table must be an int32 tensor (batch, max_pages) on q's device, rows contiguous");
  TORCH_CHECK(k.size(1) % 16 == 0 && k.size(0) > 0,
              "flash_attn_t: a paged cache needs pages and a page size that is a multiple of 16");
}

// Whether the kernels for this call read a paged K/V in place: the sm90 ones without softcap or
// ALiBi, at head dims up to 128 (a page's TMA box has up to 128 rows, paged_box_rows; the hd256
// kernel's key blocks have 64). The others get the pages gathered into a contiguous copy
// (gathered_pages).
bool reads_pages_in_place(int head_dim, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  return sm90_kernels_available() && head_dim <= 128 && softcap <= 0 && !alibi_slopes.has_value();
}

// The pool's pages as (batch, max_pages x page_size, heads_k, dim), table entries clamped.
at::Tensor gathered_pages(const at::Tensor& pool, const at::Tensor& block_table) {
  return pool.index({block_table.clamp(0, pool.size(0) - 1).to(at::kLong)}).flatten(1, 2);
}

void set_block_table(FwdParams& p, const at::Tensor& block_table, int page_size) {
  p.block_table = block_table.data_ptr<int>();
  p.block_table_stride = block_table.stride(0);
  p.max_pages = static_cast<int>(block_table.size(1));
  p.page_size = page_size;
  p.split_round_bits = paged_box_rows(p) - 1;
}

// Attention of q against a KV cache (batch_k, seqlen_cache, heads_k, dim): query batch b reads
// cache row kv_batch_idx[b] (b when absent), keys [leftpad_k[b], seqused_k[b]) (seqused_k absent: the
// whole cache, so a decode call through flash_attn_func launches no fill kernel), causal aligned at
// the end of those keys. The values are clamped into range in the kernels (see params.h).
// num_splits > 1: each sequence's keys cut into num_splits equal parts, one output row per
// (sequence, split), batch-major, for flash_attn_t.decode to merge (no mask: positions would move).
// block_table (batch, max_pages) int32: k_cache, v_cache are pools of pages (num_pages,
// page_size, heads_k, dim); the sm90 kernels without softcap or ALiBi read the pages in place
// (params.h), the others get them gathered into contiguous caches first.
std::tuple<at::Tensor, at::Tensor> fwd_kvcache(const at::Tensor& q, const at::Tensor& k_cache_,
                                               const at::Tensor& v_cache_,
                                               const std::optional<at::Tensor>& seqused_k,
                                               const std::optional<at::Tensor>& kv_batch_idx,
                                               const std::optional<at::Tensor>& leftpad_k, double softmax_scale,
                                               bool causal, int64_t window_left, int64_t window_right,
                                               double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                               int64_t num_splits, const std::optional<at::Tensor>& learnable_sink,
                                               const std::optional<at::Tensor>& block_table) {
  check_q(q, 4);
  check_tensor(k_cache_, "k_cache", 4, q);
  check_tensor(v_cache_, "v_cache", 4, q);
  const bool paged = block_table.has_value();
  if (paged) {
    check_paged_kv(*block_table, k_cache_, q, q.size(0));
    TORCH_CHECK(!kv_batch_idx.has_value() && !leftpad_k.has_value(),
                "flash_attn_t: block_table takes no kv_batch_idx or leftpad_k");
    TORCH_CHECK(seqused_k.has_value(), "flash_attn_t: block_table needs seqused_k (the sequences' lengths)");
  }
  const bool gather = paged && !reads_pages_in_place(static_cast<int>(q.size(-1)), softcap, alibi_slopes);
  const at::Tensor k_cache = gather ? gathered_pages(k_cache_, *block_table) : k_cache_;
  const at::Tensor v_cache = gather ? gathered_pages(v_cache_, *block_table) : v_cache_;
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "flash_attn_t: k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.size(-1) == q.size(-1), "flash_attn_t: k_cache must have q's head dim");
  TORCH_CHECK(k_cache.size(-2) > 0 && q.size(-2) % k_cache.size(-2) == 0,
              "flash_attn_t: q's head count must be a multiple of k_cache's");
  TORCH_CHECK(paged || (kv_batch_idx.has_value() ? k_cache.size(0) > 0 : k_cache.size(0) == q.size(0)),
              "flash_attn_t: k_cache must have q's batch size (or kv_batch_idx must select its rows)");
  check_batch_index(seqused_k, "seqused_k", q);
  check_batch_index(kv_batch_idx, "kv_batch_idx", q);
  check_batch_index(leftpad_k, "leftpad_k", q);
  TORCH_CHECK(num_splits >= 1 && num_splits <= 1024, "flash_attn_t: num_splits must be in [1, 1024], got ",
              num_splits);
  TORCH_CHECK(num_splits == 1 || (!causal && window_left < 0 && window_right < 0 && !alibi_slopes.has_value()),
              "flash_attn_t: num_splits > 1 takes no causal mask, window or alibi_slopes");
  TORCH_CHECK(num_splits == 1 || !learnable_sink.has_value(),
              "flash_attn_t: num_splits > 1 takes no learnable_sink (apply it to the merged splits)");
  return batched_fwd(
      q, k_cache, v_cache, softmax_scale, {causal, window_left, window_right, softcap, alibi_slopes}, learnable_sink,
      [&](FwdParams& p) {
        p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
        p.kv_batch_idx = kv_batch_idx.has_value() ? kv_batch_idx->data_ptr<int>() : nullptr;
        p.leftpad_k = leftpad_k.has_value() ? leftpad_k->data_ptr<int>() : nullptr;
        if (paged && !gather) {
          set_block_table(p, *block_table, static_cast<int>(k_cache.size(1)));
          p.seqlen_k = p.max_pages * p.page_size;  // a sequence's capacity
        }
      },
      num_splits);
}

// block_table (batch, max_pages) int32: a paged prefill. k, v are pools of pages (num_pages,
// page_size, heads_k, dim) and sequence b's keys are its first cu_seqlens_k[b + 1] -
// cu_seqlens_k[b], through row b of the table (forward only, as in flash_attn). The sm90 kernels
// without softcap or ALiBi read the pages in place, the others get them gathered first.
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                              bool causal, int64_t window_left, int64_t window_right,
                                              double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                              const std::optional<at::Tensor>& learnable_sink,
                                              const std::optional<at::Tensor>& block_table, double dropout_p,
                                              const std::optional<at::Tensor>& rng_state) {
  const bool paged = block_table.has_value();
  check_q(q_, 3);
  TORCH_CHECK(!paged || dropout_p == 0, "flash_attn_t: dropout_p > 0 with block_table is not implemented");
  check_kv(q_, k_, v_, paged ? 4 : 3);  // a paged prefill's k, v: pools of pages, 4 dimensions
  if (paged) check_paged_kv(*block_table, k_, q_, cu_seqlens_q.numel() - 1);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q_);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q_);
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
              "flash_attn_t: cu_seqlens_q and cu_seqlens_k must have the same length");
  const c10::cuda::CUDAGuard guard(q_.device());
  const bool gather = paged && !reads_pages_in_place(static_cast<int>(q_.size(-1)), softcap, alibi_slopes);
  const at::Tensor q = aligned(q_);
  const at::Tensor k = aligned(gather ? gathered_pages(k_, *block_table) : k_);
  const at::Tensor v = aligned(gather ? gathered_pages(v_, *block_table) : v_);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  FwdParams p{};
  fill_fwd(p, q, k, v, out, lse, softmax_scale);
  p.batch = static_cast<int>(cu_seqlens_q.numel() - 1);
  p.seqlen_q = static_cast<int>(max_seqlen_q);
  p.seqlen_k = static_cast<int>(max_seqlen_k);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  at::Tensor seqused_k;
  if (paged) {  // k, v batched: sequence b's key count, on the device (no host sync)
    const int64_t batch = cu_seqlens_k.numel() - 1;
    seqused_k = cu_seqlens_k.narrow(0, 1, batch) - cu_seqlens_k.narrow(0, 0, batch);
    p.cu_seqlens_k = nullptr;
    p.seqused_k = seqused_k.data_ptr<int>();
    p.batch_k = static_cast<int>(k.size(0));
    p.seqlen_k = static_cast<int>(block_table->size(1) * k_.size(1));  // a sequence's capacity
    if (!gather) set_block_table(p, *block_table, static_cast<int>(k.size(1)));
  }
  set_sink(p, learnable_sink, q);
  const Variant variant{causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                        forward_rng_state(dropout_p, rng_state, q)};
  if (q.size(0) > 0) launch_fwd(p, q, variant);
  return {out, lse};
}

void fill_bwd(BwdParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dk,
              const at::Tensor& dv, double softmax_scale) {
  fill_fwd(p, q, k, v, out, lse, softmax_scale);
  p.dout = dout.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides_of(dout, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  strides_of(dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
}

// Shared by the batched and varlen backward, once p holds the tensors: an fp32 dq_accum of q's
// sizes with a leading split dimension (cleared by the dsum pass), the dsum pass, the main kernel,
// then dq = (sum over splits) * softmax_scale in q's dtype. Returns dq and dsum = rowsum(dout *
// out), laid out like lse (flash_attn's softmax_d; an attention sink's gradient is made of it).
std::tuple<at::Tensor, at::Tensor> launch_bwd(BwdParams& p, const at::Tensor& q, const at::Tensor& lse,
                                              const Variant& variant, bool deterministic) {
  set_variant(p, variant);
  if (p.batch == 0 || p.seqlen_q == 0 || q.numel() == 0)
    return {at::zeros(q.sizes(), q.options()), at::zeros_like(lse)};
  int splits = 1;
  if (deterministic) {
    int sms = 0;
    check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()),
                 "device query for the");
    const int ctas = std::max(1, p.batch * p.heads_k);
    const int max_blocks = std::max(1, (p.seqlen_k + kBwdBlockN - 1) / kBwdBlockN);
    splits = std::max(1, std::min(max_blocks, (2 * sms + ctas - 1) / ctas));
  }
  // dq_accum: heads before rows (see params.h), viewed in q's dimension order for the strides.
  const bool varlen = q.dim() == 3;
  std::vector<int64_t> acc_shape{splits};
  if (!varlen) acc_shape.push_back(q.size(0));
  acc_shape.insert(acc_shape.end(), {q.size(-2), q.size(-3), q.size(-1)});
  at::Tensor dq_accum = at::empty(acc_shape, q.options().dtype(at::kFloat))
                            .transpose(varlen ? 1 : 2, varlen ? 2 : 3);
  at::Tensor dsum = at::empty_like(lse);  // laid out like lse
  at::Tensor dq = at::empty(q.sizes(), q.options());
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  strides_of(dq_accum[0], p.dq_accum_batch_stride, p.dq_accum_row_stride, p.dq_accum_head_stride);
  p.dq_accum_split_stride = dq_accum.stride(0);
  p.num_splits = splits;
  p.deterministic = deterministic;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  strides_of(dq, dq_batch_stride, dq_row_stride, dq_head_stride);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch(q.scalar_type(), p.head_dim,
                        [&](auto element, auto dim) {
                          return run_bwd_dsum<decltype(element), decltype(dim)::value>(p, stream);
                        }),
               "backward dsum");
  if (p.seqlen_k > 0) {
    const bool sm90 = use_sm90_kernels(p, /*backward=*/true);
    check_launch(dispatch(q.scalar_type(), p.head_dim,
                          [&](auto element, auto dim) {
                            using Element = decltype(element);
                            constexpr int kDim = decltype(dim)::value;
                            if constexpr (has_sm90_kernels(kDim, /*backward=*/true))
                              if (sm90) return run_bwd_sm90<Element, kDim>(p, stream);
                            return run_bwd_sm80<Element, kDim>(p, stream);
                          }),
                 "backward");
  }
  check_launch(dispatch(q.scalar_type(), p.head_dim,
                        [&](auto element, auto dim) {
                          return run_bwd_dq_convert<decltype(element), decltype(dim)::value>(
                              p, dq.data_ptr(), dq_batch_stride, dq_row_stride, dq_head_stride, stream);
                        }),
               "backward dq conversion");
  return {dq, dsum};
}

// A backward's dropout: the forward's rng_state, checked (dropout_p > 0), or null.
const int64_t* backward_rng_state(double dropout_p, const std::optional<at::Tensor>& rng_state, const at::Tensor& q) {
  if (dropout_p <= 0) return nullptr;
  check_rng_state(rng_state, q);
  return rng_state->data_ptr<int64_t>();
}

void check_bwd_extra(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& q, const at::Tensor& lse,
                     at::IntArrayRef lse_shape) {
  check_tensor(dout, "dout", q.dim(), q);
  check_tensor(out, "out", q.dim(), q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "flash_attn_t: dout and out must have q's shape");
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == lse_shape,
              "flash_attn_t: lse must be float32 of shape ", lse_shape, " on q's device");
}

// Shared by bwd and varlen_bwd once their own arguments are checked: set_lengths fills batch,
// seqlens and, for varlen, the cu_seqlens pointers.
template <typename SetLengths>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout_, const at::Tensor& q_,
                                                        const at::Tensor& k_, const at::Tensor& v_,
                                                        const at::Tensor& out_, const at::Tensor& lse_,
                                                        double softmax_scale, const Variant& variant,
                                                        bool deterministic,
                                                        SetLengths&& set_lengths) {
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_), out = aligned(out_),
                   dout = aligned(dout_), lse = lse_.contiguous();
  at::Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  BwdParams p{};
  fill_bwd(p, dout, q, k, v, out, lse, dk, dv, softmax_scale);
  set_lengths(p);
  auto [dq, dsum] = launch_bwd(p, q, lse, variant, deterministic);
  if (p.seqlen_q == 0 || q.numel() == 0) dk.zero_(), dv.zero_();  // no query: the kernel never ran
  return {dq, dk, dv, dsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q,
                                                   const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& out, const at::Tensor& lse,
                                                   double softmax_scale, bool causal, bool deterministic,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                                   const std::optional<at::Tensor>& rng_state) {
  check_qkv(q, k, v, 4);
  check_bwd_extra(dout, out, q, lse, {q.size(0), q.size(2), q.size(1)});
  return backward(dout, q, k, v, out, lse, softmax_scale,
                  {causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                   backward_rng_state(dropout_p, rng_state, q)},
                  deterministic,
                  [&](BwdParams& p) {
    p.batch = p.batch_k = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(1));
    p.seqlen_k = static_cast<int>(k.size(1));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, bool causal, bool deterministic, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  check_qkv(q, k, v, 3);
  check_bwd_extra(dout, out, q, lse, {q.size(1), q.size(0)});
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
              "flash_attn_t: cu_seqlens_q and cu_seqlens_k must have the same length");
  return backward(dout, q, k, v, out, lse, softmax_scale,
                  {causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                   backward_rng_state(dropout_p, rng_state, q)},
                  deterministic, [&](BwdParams& p) {
    p.batch = static_cast<int>(cu_seqlens_q.numel() - 1);
    p.seqlen_q = static_cast<int>(max_seqlen_q);
    p.seqlen_k = static_cast<int>(max_seqlen_k);
    p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  });
}

// Split-KV's merge: out_partial (batch x num_splits, rows, heads_k, dim) and lse_partial (batch x
// num_splits, heads_k, rows) from fwd_kvcache(num_splits) on packed rows (query, head in group)
// -> out (batch, rows / group, heads_k x group, dim), lse (batch, heads_k x group, rows / group).
std::tuple<at::Tensor, at::Tensor> merge_splits(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                                int64_t num_splits, int64_t group) {
  TORCH_CHECK(out_partial.is_cuda() && out_partial.dim() == 4 && out_partial.is_contiguous() &&
                  (out_partial.scalar_type() == at::kHalf || out_partial.scalar_type() == at::kBFloat16),
              "flash_attn_t: out_partial must be a contiguous fp16/bf16 CUDA tensor (batch x splits, rows, heads_k, "
              "dim)");
  TORCH_CHECK(num_splits >= 1 && group >= 1 && out_partial.size(0) % num_splits == 0 &&
                  out_partial.size(1) % group == 0,
              "flash_attn_t: merge_splits needs batch x num_splits partial rows and rows a multiple of group");
  const int64_t batch = out_partial.size(0) / num_splits, rows = out_partial.size(1), heads_k = out_partial.size(2);
  TORCH_CHECK(lse_partial.is_cuda() && lse_partial.device() == out_partial.device() &&
                  lse_partial.scalar_type() == at::kFloat && lse_partial.is_contiguous() &&
                  lse_partial.sizes() == at::IntArrayRef({out_partial.size(0), heads_k, rows}),
              "flash_attn_t: lse_partial must be contiguous float32 (batch x splits, heads_k, rows)");
  const c10::cuda::CUDAGuard guard(out_partial.device());
  const int64_t seqlen_q = rows / group;
  at::Tensor out = at::empty({batch, seqlen_q, heads_k * group, out_partial.size(3)}, out_partial.options());
  at::Tensor lse = at::empty({batch, heads_k * group, seqlen_q}, lse_partial.options());
  MergeParams p{out_partial.data_ptr(), lse_partial.data_ptr<float>(), out.data_ptr(), lse.data_ptr<float>(),
                static_cast<int>(batch), static_cast<int>(num_splits), static_cast<int>(rows),
                static_cast<int>(heads_k), static_cast<int>(group), static_cast<int>(seqlen_q)};
  check_launch(dispatch(out_partial.scalar_type(), static_cast<int>(out_partial.size(3)),
                        [&](auto element, auto dim) {
                          return run_merge_splits<decltype(element), decltype(dim)::value>(
                              p, c10::cuda::getCurrentCUDAStream());
                        }),
               "split merge");
  return {out, lse};
}

}  // namespace
}  // namespace fat

TORCH_LIBRARY(flash_attn_t, m) {
  // window_left / window_right: flash_attn's window_size, -1 for an unbounded edge. dropout_p > 0:
  // fwd / varlen_fwd write the call's (seed, offset) into rng_state (int64 (2,)), which the
  // backward takes back.
  m.def("fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, int window_left=-1, "
        "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? learnable_sink=None, "
        "float dropout_p=0.0, Tensor(a!)? rng_state=None) -> (Tensor, Tensor)");
  // bwd / varlen_bwd return (dq, dk, dv, dsum): dsum = rowsum(dout * out), laid out like lse.
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, "
        "bool causal, bool deterministic, int window_left=-1, int window_right=-1, float softcap=0.0, "
        "Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fwd_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seqused_k, Tensor? kv_batch_idx, "
        "Tensor? leftpad_k, float softmax_scale, bool causal, int window_left=-1, int window_right=-1, "
        "float softcap=0.0, Tensor? alibi_slopes=None, int num_splits=1, Tensor? learnable_sink=None, "
        "Tensor? block_table=None) -> (Tensor, Tensor)");
  m.def("varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left=-1, "
        "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? learnable_sink=None, "
        "Tensor? block_table=None, float dropout_p=0.0, Tensor(a!)? rng_state=None) -> (Tensor, Tensor)");
  m.def("varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
        "float softmax_scale, bool causal, bool deterministic, int window_left=-1, int window_right=-1, "
        "float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, Tensor? rng_state=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("merge_splits(Tensor out_partial, Tensor lse_partial, int num_splits, int group) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flash_attn_t, CUDA, m) {
  m.impl("fwd", &fat::fwd);
  m.impl("bwd", &fat::bwd);
  m.impl("fwd_kvcache", &fat::fwd_kvcache);
  m.impl("varlen_fwd", &fat::varlen_fwd);
  m.impl("varlen_bwd", &fat::varlen_bwd);
  m.impl("merge_splits", &fat::merge_splits);
}

// `import flash_attn_t._C` runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
