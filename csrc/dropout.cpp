// Dropout on CPU with an in-kernel Philox4x32-10 mask, the same stream as the
// Triton kernel: element i of the dense storage uses lane i % 4 of the block
// philox(key = seed, counter = (i / 4, offset)); it is kept when the top 24 bits
// of that word are >= threshold = round(p * 2^24). Forward and backward are the
// same computation (out = in * keep * scale), so one kernel serves both and no
// mask is ever stored.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "common.h"

namespace pyops {

namespace {

constexpr int64_t kGrainCounters = 4096;

}  // namespace

// out[i] = in[i] * (keep(i) ? scale : 0); `out` may alias `in` (in-place dropout).
void dropout_apply(const at::Tensor& input, const at::Tensor& out, const at::Tensor& seed_offset,
                   int64_t threshold, double scale) {
  check_dense_cpu(input, "input");
  check_dense_cpu(out, "out");
  check_same_layout(input, "input", out, "out");
  TORCH_CHECK(seed_offset.device().is_cpu() && seed_offset.scalar_type() == at::kLong &&
                  seed_offset.numel() == 2,
              "seed_offset must be a CPU int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 24),
              "threshold must be in [0, 2^24], got ", threshold);
  const auto so = seed_offset.contiguous();
  const uint64_t seed = static_cast<uint64_t>(so.const_data_ptr<int64_t>()[0]);
  const uint64_t offset = static_cast<uint64_t>(so.const_data_ptr<int64_t>()[1]);
  const int64_t n = input.numel();
  const int64_t n_counters = (n + 3) / 4;
  const uint32_t thr = static_cast<uint32_t>(threshold);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t s = static_cast<opmath_t>(scale);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_counters, kGrainCounters, [&](int64_t cbegin, int64_t cend) {
      // Locals, not captured references: the compiler must see that the stores
      // below cannot change them, or it will not vectorise the mask loop.
      const uint32_t t = thr;
      const opmath_t sc = s;
      uint32_t words[kPhiloxBatch][4];
      for (int64_t c = cbegin; c < cend; c += kPhiloxBatch) {
        philox_batch(static_cast<uint64_t>(c), seed, offset, words);
        // words, read flat, hold one word per element in element order.
        const uint32_t* w = &words[0][0];
        const int64_t first = c * 4;
        const int64_t len = std::min<int64_t>(n, std::min<int64_t>(c + kPhiloxBatch, cend) * 4) - first;
        const scalar_t* src = in + first;
        scalar_t* dst = o + first;
        alignas(64) opmath_t m[kPhiloxBatch * 4];
        for (int64_t k = 0; k < kPhiloxBatch * 4; ++k) m[k] = (w[k] >> 8) >= t ? sc : opmath_t(0);
        int64_t k = 0;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          using Vec = at::vec::Vectorized<scalar_t>;
          for (; k + Vec::size() <= len; k += Vec::size())
            (Vec::loadu(src + k) * Vec::loadu(m + k)).store(dst + k);
        }
        for (; k < len; ++k) dst[k] = static_cast<scalar_t>(static_cast<opmath_t>(src[k]) * m[k]);
      }
    });
  });
}

// Raw Philox4x32-10 blocks for counters [first, first + n) of (seed, offset): the stream the
// kernels use, exposed so tests can check it against known-answer vectors and
// against the Triton implementation.
at::Tensor philox_blocks(int64_t seed, int64_t offset, int64_t first, int64_t n) {
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  auto out = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  uint32_t words[kPhiloxBatch][4];
  for (int64_t c = 0; c < n; c += kPhiloxBatch) {
    const int64_t count = std::min<int64_t>(kPhiloxBatch, n - c);
    philox_batch(static_cast<uint64_t>(first) + static_cast<uint64_t>(c), static_cast<uint64_t>(seed),
                 static_cast<uint64_t>(offset), words);
    for (int64_t j = 0; j < count; ++j)
      for (int k = 0; k < 4; ++k) o[(c + j) * 4 + k] = words[j][k];
  }
  return out;
}

}  // namespace pyops
