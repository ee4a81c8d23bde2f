// Sigmoid forward and backward on CPU: vectorised with at::vec, parallel with
// at::parallel_for. Half and BFloat16 compute in float (at::vec::map converts).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "autograd.h"
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

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The layouts the Python launchers give the kernels (pyops/_tensor.py): t when dense in
// any dim order, else a dense copy in t's dim order (empty_like's strides, as torch's
// elementwise output); an operand with exactly the strides its kernel is given.
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : at::empty_like(t).copy_(t);
}

at::Tensor with_strides(const at::Tensor& t, at::IntArrayRef strides) {
  if (t.strides() == strides) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

// The output of an elementwise op of the dense t, as torch's TensorIterator lays it out
// (pyops/_tensor.py elementwise_empty): contiguous when t is, channels_last when t is
// channels_last-contiguous, else t's strides; t's storage order in every case.
at::Tensor elementwise_empty(const at::Tensor& t) {
  if (t.is_contiguous()) return at::empty(t.sizes(), t.options());
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast));
  return at::empty_like(t);
}

// The strides TensorIterator gives the output of an elementwise op of operands of one shape
// with `operand_strides` (in argument order) when none of its fast layouts applies, as
// pyops/_tensor.py iterator_strides: dims ordered innermost first by the first operand whose
// strides tell them apart (0 tells nothing; equal strides put the smaller dim inside), packed
// densely; contiguous strides when that order is the contiguous one.
std::vector<int64_t> iterator_strides(at::IntArrayRef sizes, std::initializer_list<at::IntArrayRef> operand_strides) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> perm(nd);
  for (int64_t i = 0; i < nd; ++i) perm[i] = nd - 1 - i;  // innermost first
  auto should_swap = [&](int64_t d0, int64_t d1) {
    for (const at::IntArrayRef strides : operand_strides) {
      const int64_t s0 = strides[d0], s1 = strides[d1];
      if (s0 == 0 || s1 == 0) continue;
      if (s0 != s1) return s0 < s1 ? -1 : 1;
      if (sizes[d0] > sizes[d1]) return 1;
    }
    return 0;
  };
  for (int64_t i = 1; i < nd; ++i) {
    int64_t d1 = i;
    for (int64_t d0 = i - 1; d0 >= 0; --d0) {
      const int order = should_swap(perm[d0], perm[d1]);
      if (order > 0) {
        std::swap(perm[d0], perm[d1]);
        d1 = d0;
      } else if (order < 0) {
        break;
      }
    }
  }
  bool inverted = true;
  for (int64_t i = 0; i < nd; ++i) inverted = inverted && perm[i] == nd - 1 - i;
  std::vector<int64_t> strides(nd);
  int64_t step = 1;
  for (const int64_t dim : perm) {
    strides[dim] = step;
    step *= inverted ? std::max<int64_t>(sizes[dim], 1) : sizes[dim];
  }
  return strides;
}

// The output of torch's elementwise op of a and b (one shape, a first: a backward's incoming
// gradient), laid out as TensorIterator lays it out (pyops/_tensor.py binary_elementwise_empty).
at::Tensor binary_elementwise_empty(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return at::empty(a.sizes(), b.options());
  if (a.dim() == 4 && a.is_contiguous(at::MemoryFormat::ChannelsLast) &&
      b.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::empty(a.sizes(), b.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() && a.strides() == b.strides())
    return at::empty_strided(a.sizes(), b.strides(), b.options());
  return at::empty_strided(a.sizes(), iterator_strides(a.sizes(), {a.strides(), b.strides()}), b.options());
}

at::Tensor sigmoid_out(const at::Tensor& input) {
  const at::Tensor x = dense(input);
  at::Tensor y = elementwise_empty(x);
  if (x.numel() == 0) return y;
  sigmoid_forward(x, y);
  return y;
}

// dy * y * (1 - y) laid out as torch's sigmoid_backward(dy, y) (mostly dy's layout); the
// kernel reads both operands in that layout.
at::Tensor sigmoid_grad_out(const at::Tensor& grad, const at::Tensor& output) {
  at::Tensor dx = binary_elementwise_empty(grad, output);
  sigmoid_backward(with_strides(grad, dx.strides()), with_strides(output, dx.strides()), dx);
  return dx;
}

// grad_input = g * y * (1 - y) as a function of (g, y), SigmoidNode's backward under
// create_graph: d/dg is the same kernel on the incoming gradient, d/dy = gg * g * (1 - 2y)
// tensor arithmetic (differentiable in turn), as SigmoidBackwardFunction in Python.
struct SigmoidGradNode : public torch::autograd::Function<SigmoidGradNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& output) {
    ctx->save_for_backward({grad, output});
    return sigmoid_grad_out(grad, output);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &output = saved[1], &gg = grads[0];
    variable_list out(2);
    if (ctx->needs_input_grad(0)) out[0] = SigmoidGradNode::apply(gg, output);
    if (ctx->needs_input_grad(1)) out[1] = gg * grad * (1 - 2 * output);
    return out;
  }
};

// Sigmoid as a C++ autograd node (see autograd.h); saves only its output.
struct SigmoidNode : public torch::autograd::Function<SigmoidNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::Tensor y = sigmoid_out(x);
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    if (at::GradMode::is_enabled()) return {SigmoidGradNode::apply(grads[0], output)};
    return {sigmoid_grad_out(grads[0], output)};
  }
};

}  // namespace

at::Tensor sigmoid_autograd(const at::Tensor& x) { return records_node(x) ? SigmoidNode::apply(x) : sigmoid_out(x); }

}  // namespace pyops
