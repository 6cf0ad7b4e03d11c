// Philox4x32-7, the counter-based generator of dropout (FlashAttention-2's round count: the
// fewest rounds its authors found to pass TestU01's BigCrush; 10 adds a safety margin at 10/7
// of the integer work, which the dropout kernels are bound by), and the keep decision of one
// element.
// flash_attn_t/philox.py is the same in torch (the tests' reference) and documents the mapping of
// (batch x head, row, column) to counters: each call's 8 16-bit values are the 8 columns one lane
// of an m16n8 / wgmma accumulator holds in a 32-key group of a row, so no value is drawn twice.
#pragma once
#include <cstdint>

namespace fat {

struct Philox4 {
  uint32_t x, y, z, w;
};

__host__ __device__ __forceinline__ void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(product);
  hi = static_cast<uint32_t>(product >> 32);
#endif
}

__host__ __device__ __forceinline__ Philox4 philox4x32_7(Philox4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 7; ++round) {
    if (round > 0) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(c.x, 0xD2511F53u, hi0, lo0);
    mulhilo32(c.z, 0xCD9E8D57u, hi1, lo1);
    c = {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// The keep bits of one lane's 8 columns of a 32-key group: bit 2 t + e is column
// 32 group + 8 t + 2 quad + e (quad = lane % 4 of the accumulator layout) of row `row` of
// head `bh` (batch x nheads + head); kept when its 16-bit value is below threshold
// (round(p_keep x 65536), philox.py's keep_threshold).
__host__ __device__ __forceinline__ uint32_t dropout_keep_bits(uint64_t seed, uint32_t offset, uint32_t bh,
                                                               uint32_t row, uint32_t group, uint32_t quad,
                                                               uint32_t threshold) {
  const Philox4 r = philox4x32_7({4 * group + quad, row, bh, offset}, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
  uint32_t bits = 0;
#pragma unroll
  for (int v = 0; v < 8; ++v) {
    const uint32_t value = (words[v / 2] >> (16 * (v % 2))) & 0xFFFFu;
    bits |= static_cast<uint32_t>(value < threshold) << v;
  }
  return bits;
}

}  // namespace fat
