// Shared helpers of the C++ kernels: argument checks and the Philox4x32-10 generator.
#pragma once

// ATen alone: torch/extension.h (the whole C++ frontend and pybind11) is for bindings.cpp;
// it doubled every file's compile time.
#include <ATen/ATen.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace pyops {

// Every C++ entry receives tensors that the Python launcher already made dense
// (non-overlapping, no gaps); the kernels walk their storage as a flat array.
inline void check_dense_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, " must be non-overlapping and dense");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// Same shape and storage order: equal strides wherever a dim has more than one element (a
// size-1 dim's stride is never used; torch's outputs may differ from their inputs there).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  bool same = a.sizes() == b.sizes();
  for (int64_t d = 0; same && d < a.dim(); ++d) same = a.size(d) <= 1 || a.stride(d) == b.stride(d);
  return same;
}

inline void check_same_layout(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), an, " and ", bn, " must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(same_layout(a, b), an, " and ", bn, " must have the same strides");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// with key (seed_lo, seed_hi) and counter (ctr_lo, ctr_hi, offset_lo, offset_hi).
// triton_kernels/common.py computes the same function, so both backends draw the
// same stream for the same (seed, offset). Each call fills kPhiloxBatch consecutive
// counters, word-major: words[k][j] is word k of counter first_counter + j.
constexpr int64_t kPhiloxBatch = 16;

namespace philox {
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
}  // namespace philox

// The key (seed) of each of the ten rounds and the offset words. The AVX-512 rounds
// read each key as a memory broadcast, so no round moves it from a general register
// into a vector.
struct PhiloxKeys {
  uint64_t k0[10], k1[10];
  uint32_t o0, o1;
  PhiloxKeys(uint64_t seed, uint64_t offset)
      : o0(static_cast<uint32_t>(offset)), o1(static_cast<uint32_t>(offset >> 32)) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r, a += philox::kKeyA, b += philox::kKeyB) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// vpmuludq multiplies the low 32 bits of each 64-bit lane into the full lane. It is
// issued through asm because GCC otherwise rewrites it (with the shifts around it)
// into zero-extends, 64-bit vpmullq and permutes, which run at half the speed.
inline __m512i philox_mul_epu32(__m512i a, __m512i b) {
  __m512i r;
  __asm__("vpmuludq %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
  return r;
}

// Eight counters, one per 64-bit lane; each 32-bit word lives in the low half of its
// lane and the high half carries junk that no later step reads: vpmuludq reads only
// the low halves, and the product's low half is the next round's word.
struct Philox8 {
  __m512i w[4];  // word k of the eight counters, in the low halves of the lanes
};

inline Philox8 philox_8(__m512i ctr, const PhiloxKeys& key) {
  using namespace philox;
  __m512i c0 = ctr, c1 = _mm512_srli_epi64(ctr, 32);
  __m512i c2 = _mm512_set1_epi64(key.o0), c3 = _mm512_set1_epi64(key.o1);
  const __m512i ma = _mm512_set1_epi64(kRoundA), mb = _mm512_set1_epi64(kRoundB);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m512i pa = philox_mul_epu32(c0, ma);
    const __m512i pb = philox_mul_epu32(c2, mb);
    // 0x96: three-way xor.
    c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1, _mm512_set1_epi64(key.k0[r]), 0x96);
    c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3, _mm512_set1_epi64(key.k1[r]), 0x96);
    c1 = pb;
    c3 = pa;
  }
  return {{c0, c1, c2, c3}};
}

// The kPhiloxBatch = 16 counters from first_counter, as two groups of eight.
inline void philox_16(uint64_t first_counter, const PhiloxKeys& key, Philox8& lo, Philox8& hi) {
  const __m512i first = _mm512_set1_epi64(static_cast<long long>(first_counter));
  lo = philox_8(_mm512_add_epi64(first, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)), key);
  hi = philox_8(_mm512_add_epi64(first, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15)), key);
}
#endif

inline void philox_batch(uint64_t first_counter, const PhiloxKeys& key, uint32_t words[4][kPhiloxBatch]) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kPhiloxBatch == 16, "two AVX-512 registers of eight 64-bit lanes");
  Philox8 lo, hi;
  philox_16(first_counter, key, lo, hi);
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[k]), _mm512_cvtepi64_epi32(lo.w[k]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[k] + 8), _mm512_cvtepi64_epi32(hi.w[k]));
  }
#else
  using namespace philox;
  for (int64_t j = 0; j < kPhiloxBatch; ++j) {
    const uint64_t ctr = first_counter + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
    uint32_t c2 = key.o0, c3 = key.o1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ static_cast<uint32_t>(key.k0[r]);
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ static_cast<uint32_t>(key.k1[r]);
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
    }
    words[0][j] = c0;
    words[1][j] = c1;
    words[2][j] = c2;
    words[3][j] = c3;
  }
#endif
}

}  // namespace pyops
