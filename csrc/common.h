// Shared helpers of the C++ kernels: argument checks and the Philox4x32-10 generator.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace pyops {

// Every C++ entry receives tensors that the Python launcher already made dense
// (non-overlapping, no gaps); the kernels walk their storage as a flat array.
inline void check_dense_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, " must be non-overlapping and dense");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_layout(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), an, " and ", bn, " must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.strides() == b.strides(), an, " and ", bn, " must have the same strides");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// with key (seed_lo, seed_hi) and counter (ctr_lo, ctr_hi, offset_lo, offset_hi).
// triton_kernels/common.py computes the same function, so both backends draw the
// same stream for the same (seed, offset). Each call fills kPhiloxBatch consecutive
// counters; the loop over them is what the compiler vectorises (the ten rounds are
// unrolled inside it, 32x32->64-bit multiplies in SIMD lanes).
constexpr int64_t kPhiloxBatch = 16;

inline void philox_batch(uint64_t first_counter, uint64_t seed, uint64_t offset,
                         uint32_t words[kPhiloxBatch][4]) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t o0 = static_cast<uint32_t>(offset), o1 = static_cast<uint32_t>(offset >> 32);
  for (int64_t j = 0; j < kPhiloxBatch; ++j) {
    const uint64_t ctr = first_counter + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
    uint32_t c2 = o0, c3 = o1, k0 = s0, k1 = s1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    words[j][0] = c0;
    words[j][1] = c1;
    words[j][2] = c2;
    words[j][3] = c3;
  }
}

}  // namespace pyops
