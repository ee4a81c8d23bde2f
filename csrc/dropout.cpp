// Dropout on CPU with an in-kernel Philox4x32-10 mask, the same stream as the
// Triton kernel: element i of the dense storage uses lane i % 4 of the block
// philox(key = seed, counter = (i / 4, offset)); it is kept when the top 24 bits
// of that word are >= threshold = round(p * 2^24). Forward and backward are the
// same computation (out = in * keep * scale), so one kernel serves both.
//
// On the CPU, Philox (~0.55 ns per element and core) costs more than the memory traffic
// of applying a mask, so the forward may also write the keep decisions as bits (one
// int64 word per 64 elements: 1/32 of a float32 input) and the backward applies those
// (dropout_apply_bits) instead of regenerating them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "common.h"

namespace pyops {

namespace {

constexpr int64_t kGrainCounters = 4096;
constexpr int64_t kBatchElems = kPhiloxBatch * 4;

// Bit j of a 16-bit mask moves to bit 4j.
inline uint64_t spread4(uint64_t x) {
  x &= 0xFFFFu;
  x = (x | (x << 24)) & 0x000000FF000000FFull;
  x = (x | (x << 12)) & 0x000F000F000F000Full;
  x = (x | (x << 6)) & 0x0303030303030303ull;
  x = (x | (x << 3)) & 0x1111111111111111ull;
  return x;
}

// Bit 4j + k set: element 4j + k of the batch of counters from `counter` (word k of
// counter j) is kept, i.e. (word >> 8) >= threshold, i.e. word >= threshold << 8.
inline uint64_t keep_bits(uint64_t counter, const PhiloxKeys& key, uint32_t threshold) {
  uint64_t bits = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // The words stay in registers: stored and reloaded, they stall on store forwarding.
  Philox8 lo, hi;
  philox_16(counter, key, lo, hi);
  const __m512i low_half = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i t = _mm512_set1_epi64(static_cast<long long>(static_cast<uint64_t>(threshold) << 8));
  for (int k = 0; k < 4; ++k) {
    const uint64_t m_lo = _mm512_cmpge_epu64_mask(_mm512_and_si512(lo.w[k], low_half), t);
    const uint64_t m_hi = _mm512_cmpge_epu64_mask(_mm512_and_si512(hi.w[k], low_half), t);
    bits |= spread4(m_lo | (m_hi << 8)) << k;
  }
#else
  uint32_t words[4][kPhiloxBatch];
  philox_batch(counter, key, words);
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < kPhiloxBatch; ++j)
      bits |= static_cast<uint64_t>((words[k][j] >> 8) >= threshold) << (4 * j + k);
#endif
  return bits;
}

// dst[k] = src[k] * (bit k ? scale : 0) for the k < len elements of one batch. A dropped
// NaN stays NaN (NaN * 0), as in torch.
template <typename scalar_t, typename opmath_t>
inline void apply_batch(const scalar_t* src, scalar_t* dst, int64_t len, uint64_t bits, opmath_t scale) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (len == kBatchElems) {
      const __m512 s = _mm512_set1_ps(scale);
      for (int q = 0; q < 4; ++q) {
        const __m512 mult = _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> (16 * q)), s);
        _mm512_storeu_ps(dst + 16 * q, _mm512_mul_ps(_mm512_loadu_ps(src + 16 * q), mult));
      }
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (len == kBatchElems) {
      const __m512d s = _mm512_set1_pd(scale);
      for (int q = 0; q < 8; ++q) {
        const __m512d mult = _mm512_maskz_mov_pd(static_cast<__mmask8>(bits >> (8 * q)), s);
        _mm512_storeu_pd(dst + 8 * q, _mm512_mul_pd(_mm512_loadu_pd(src + 8 * q), mult));
      }
      return;
    }
  }
#endif
  alignas(64) opmath_t m[kBatchElems];
  for (int64_t k = 0; k < kBatchElems; ++k) m[k] = ((bits >> k) & 1u) ? scale : opmath_t(0);
  int64_t k = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    for (; k + Vec::size() <= len; k += Vec::size()) (Vec::loadu(src + k) * Vec::loadu(m + k)).store(dst + k);
  }
  for (; k < len; ++k) dst[k] = static_cast<scalar_t>(static_cast<opmath_t>(src[k]) * m[k]);
}

// Words of keep bits for n elements: bit k of word b is element 64 * b + k.
inline int64_t bit_words(int64_t n) { return (n + kBatchElems - 1) / kBatchElems; }

void check_bits(const at::Tensor& bits, int64_t n) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kLong && bits.is_contiguous() &&
                  bits.numel() == bit_words(n),
              "keep bits must be a contiguous CPU int64 tensor of ", bit_words(n), " words, got ", bits.sizes());
}

// out = in * (keep ? scale : 0) over the 64-element batches of dense tensors (batch b:
// elements [64 b, 64 b + 64), Philox counters [16 b, 16 b + 16)), batch b's keep bits
// from bits_of(b, len), len its element count (64 but for the last batch).
template <typename BitsOf>
void apply_batches(const at::Tensor& input, const at::Tensor& out, double scale, const BitsOf& bits_of) {
  const int64_t n = input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t s = static_cast<opmath_t>(scale);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, bit_words(n), kGrainCounters / kPhiloxBatch, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t first = b * kBatchElems, len = std::min<int64_t>(n - first, kBatchElems);
        apply_batch<scalar_t, opmath_t>(in + first, o + first, len, bits_of(b, len), s);
      }
    });
  });
}

void check_in_out(const at::Tensor& input, const at::Tensor& out) {
  check_dense_cpu(input, "input");
  check_dense_cpu(out, "out");
  check_same_layout(input, "input", out, "out");
}

}  // namespace

// out[i] = in[i] * (keep(i) ? scale : 0); `out` may alias `in` (in-place dropout). With
// keep_bits_out, the keep decisions are also written there as bits (see check_bits).
void dropout_apply(const at::Tensor& input, const at::Tensor& out, const at::Tensor& seed_offset,
                   int64_t threshold, double scale, const c10::optional<at::Tensor>& keep_bits_out) {
  check_in_out(input, out);
  TORCH_CHECK(seed_offset.device().is_cpu() && seed_offset.scalar_type() == at::kLong &&
                  seed_offset.numel() == 2,
              "seed_offset must be a CPU int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 24),
              "threshold must be in [0, 2^24], got ", threshold);
  const auto so = seed_offset.contiguous();
  const PhiloxKeys key(static_cast<uint64_t>(so.const_data_ptr<int64_t>()[0]),
                       static_cast<uint64_t>(so.const_data_ptr<int64_t>()[1]));
  const uint32_t thr = static_cast<uint32_t>(threshold);
  int64_t* words = nullptr;
  if (keep_bits_out.has_value()) {
    check_bits(*keep_bits_out, input.numel());
    words = keep_bits_out->mutable_data_ptr<int64_t>();
  }
  apply_batches(input, out, scale, [&](int64_t b, int64_t len) {
    const uint64_t bits = keep_bits(static_cast<uint64_t>(b * kPhiloxBatch), key, thr);
    if (words != nullptr) words[b] = static_cast<int64_t>(len == kBatchElems ? bits : bits & ((uint64_t{1} << len) - 1));
    return bits;
  });
}

// out[i] = in[i] * (bit i of keep_bits ? scale : 0): dropout with the mask a forward saved.
void dropout_apply_bits(const at::Tensor& input, const at::Tensor& out, const at::Tensor& keep_bits,
                        double scale) {
  check_in_out(input, out);
  check_bits(keep_bits, input.numel());
  const int64_t* words = keep_bits.const_data_ptr<int64_t>();
  apply_batches(input, out, scale, [&](int64_t b, int64_t) { return static_cast<uint64_t>(words[b]); });
}

at::Tensor philox_blocks(int64_t seed, int64_t offset, int64_t first, int64_t n) {
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  auto out = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const PhiloxKeys key(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  uint32_t words[4][kPhiloxBatch];
  for (int64_t c = 0; c < n; c += kPhiloxBatch) {
    const int64_t count = std::min<int64_t>(kPhiloxBatch, n - c);
    philox_batch(static_cast<uint64_t>(first) + static_cast<uint64_t>(c), key, words);
    for (int64_t j = 0; j < count; ++j)
      for (int k = 0; k < 4; ++k) o[(c + j) * 4 + k] = words[k][j];
  }
  return out;
}

}  // namespace pyops
