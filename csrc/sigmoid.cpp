// Sigmoid forward and backward on CPU: vectorised with at::vec, parallel with
// at::parallel_for. Half and BFloat16 compute in float (at::vec::map converts).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "common.h"

namespace pyops {

namespace {
constexpr int64_t kGrain = 32768;
}

// y = 1 / (1 + exp(-x)), written into y (same shape, strides and dtype as x). IEEE arithmetic keeps this stable for large |x|:
// exp(-x) overflows to +inf for x << 0, giving exactly 0, and underflows to 0
// for x >> 0, giving exactly 1; no inf/inf or NaN appears.
void sigmoid_forward(const at::Tensor& x, const at::Tensor& y) {
  check_dense_cpu(x, "input");
  check_dense_cpu(y, "out");
  check_same_layout(x, "input", y, "out");
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pyops_sigmoid_forward", [&] {
    // A lambda over Vectorized<opmath_t> makes at::vec::map compute Half and BFloat16
    // in float and round once (a generic lambda would pick the 16-bit arithmetic).
    using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      at::vec::map(
          [](Vec v) {
            const Vec one(1);
            return one / (one + v.neg().exp());
          },
          out + begin, in + begin, end - begin);
    });
  });
}

// dx = dy * y * (1 - y), from the saved output y (as torch's sigmoid_backward).
void sigmoid_backward(const at::Tensor& grad_output, const at::Tensor& output,
                      const at::Tensor& grad_input) {
  check_dense_cpu(grad_output, "grad_output");
  check_dense_cpu(output, "output");
  check_dense_cpu(grad_input, "grad_input");
  check_same_layout(grad_output, "grad_output", output, "output");
  check_same_layout(grad_input, "grad_input", output, "output");
  const int64_t n = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "pyops_sigmoid_backward", [&] {
    using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* y = output.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      at::vec::map2(
          [](Vec g, Vec s) { return g * s * (Vec(1) - s); },
          dx + begin, dy + begin, y + begin, end - begin);
    });
  });
}

}  // namespace pyops
