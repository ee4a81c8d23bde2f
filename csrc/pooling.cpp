// Max and average pooling on CPU, forward and backward, for 4-D inputs in NCHW or
// channels_last layout (the kernels index through strides, so both work).
//
// Window arithmetic mirrors pyops/_pool.py and triton_kernels/pooling.py: a window
// starts at o * stride - pad; max pooling steps through it by dilation and skips
// padding; average pooling clips it to [-pad, size + pad) for the count_include_pad
// divisor and to [0, size) for the summed elements.
//
// Forward is parallel over N*C planes (over output rows too when the planes are few).
// Backward scatters one plane at a time inside a thread, so the result is
// deterministic even where windows overlap.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <optional>

#include "common.h"

namespace pyops {

namespace {

struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
};

struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

void check_pool_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
}

Geometry geometry(const at::Tensor& input, const at::Tensor& output, at::IntArrayRef kernel,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "kernel_size, stride, padding and dilation must have two values each");
  TORCH_CHECK(kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 &&
                  dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              "kernel_size, stride and dilation must be positive and padding non-negative");
  TORCH_CHECK(input.size(0) == output.size(0) && input.size(1) == output.size(1),
              "input and output must agree in N and C");
  return {input.size(0), input.size(1), input.size(2), input.size(3), output.size(2), output.size(3),
          kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
}

// Run f(n, c, oh_begin, oh_end) over all planes, splitting output rows when N*C alone
// cannot keep every thread busy.
template <typename F>
void for_each_plane_rows(const Geometry& g, const F& f) {
  const int64_t planes = g.N * g.C;
  const int64_t threads = at::get_num_threads();
  const int64_t row_split = planes >= threads ? 1 : std::min<int64_t>(g.OH, (threads + planes - 1) / planes);
  const int64_t rows_per = (g.OH + row_split - 1) / std::max<int64_t>(row_split, 1);
  at::parallel_for(0, planes * row_split, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t plane = t / row_split, part = t % row_split;
      const int64_t r0 = part * rows_per, r1 = std::min(g.OH, r0 + rows_per);
      if (r0 < r1) f(plane / g.C, plane % g.C, r0, r1);
    }
  });
}

inline int64_t first_valid(int64_t start, int64_t step) {
  // smallest start + k * step >= 0 (k >= 0)
  return start >= 0 ? start : start + ((-start + step - 1) / step) * step;
}

}  // namespace

void max_pool2d_forward(const at::Tensor& input, const at::Tensor& output, const at::Tensor& indices,
                        at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation) {
  check_pool_tensor(input, "input");
  check_pool_tensor(output, "output");
  check_pool_tensor(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(output.sizes() == indices.sizes(), "output and indices must have the same shape");
  const Geometry g = geometry(input, output, kernel, stride, padding, dilation);
  const Strides4 si(input), so(output), sx(indices);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_max_pool2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    for_each_plane_rows(g, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
      const scalar_t* plane = in + n * si.n + c * si.c;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t hs = oh * g.sH - g.pH;
        const int64_t h0 = first_valid(hs, g.dH);
        const int64_t h1 = std::min(hs + (g.kH - 1) * g.dH + 1, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t ws = ow * g.sW - g.pW;
          const int64_t w0 = first_valid(ws, g.dW);
          const int64_t w1 = std::min(ws + (g.kW - 1) * g.dW + 1, g.W);
          // torch's rule: start from the window's first in-bounds position at -inf;
          // a strictly larger value or any NaN takes over (ties keep the first).
          int64_t best = h0 * g.W + w0;
          acc_t best_val = -std::numeric_limits<acc_t>::infinity();
          for (int64_t h = h0; h < h1; h += g.dH) {
            for (int64_t w = w0; w < w1; w += g.dW) {
              const acc_t v = static_cast<acc_t>(plane[h * si.h + w * si.w]);
              if (v > best_val || std::isnan(v)) {
                best_val = v;
                best = h * g.W + w;
              }
            }
          }
          out[n * so.n + c * so.c + oh * so.h + ow * so.w] = static_cast<scalar_t>(best_val);
          idx[n * sx.n + c * sx.c + oh * sx.h + ow * sx.w] = best;
        }
      }
    });
  });
}

void max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& grad_input) {
  check_pool_tensor(grad_output, "grad_output");
  check_pool_tensor(indices, "indices");
  check_pool_tensor(grad_input, "grad_input");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), "grad_output and indices must have the same shape");
  const int64_t N = grad_input.size(0), C = grad_input.size(1), H = grad_input.size(2), W = grad_input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  const Strides4 sg(grad_output), sx(indices), si(grad_input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_max_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H * W);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t i = idx[n * sx.n + c * sx.c + oh * sx.h + ow * sx.w];
            TORCH_CHECK(i >= 0 && i < H * W, "max_pool2d_backward: index ", i, " out of range for a ", H, "x", W,
                        " plane");
            acc[i] += static_cast<acc_t>(go[n * sg.n + c * sg.c + oh * sg.h + ow * sg.w]);
          }
        }
        scalar_t* plane = gi + n * si.n + c * si.c;
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) plane[h * si.h + w * si.w] = static_cast<scalar_t>(acc[h * W + w]);
      }
    });
  });
}

namespace {

// torch's avg_pool2d divisor for the window starting at (hs, ws).
inline int64_t avg_divisor(int64_t hs, int64_t ws, const Geometry& g, bool count_include_pad,
                           int64_t divisor_override) {
  if (divisor_override != 0) return divisor_override;  // 0 stands for none
  const int64_t he = std::min(hs + g.kH, g.H + g.pH), we = std::min(ws + g.kW, g.W + g.pW);
  if (count_include_pad) return (he - hs) * (we - ws);
  return (std::min(he, g.H) - std::max<int64_t>(hs, 0)) * (std::min(we, g.W) - std::max<int64_t>(ws, 0));
}

}  // namespace

void avg_pool2d_forward(const at::Tensor& input, const at::Tensor& output, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad,
                        int64_t divisor_override) {
  check_pool_tensor(input, "input");
  check_pool_tensor(output, "output");
  const std::vector<int64_t> one{1, 1};
  const Geometry g = geometry(input, output, kernel, stride, padding, one);
  const Strides4 si(input), so(output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_avg_pool2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    for_each_plane_rows(g, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
      const scalar_t* plane = in + n * si.n + c * si.c;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t hs = oh * g.sH - g.pH;
        const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + g.kH, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t ws = ow * g.sW - g.pW;
          const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min(ws + g.kW, g.W);
          acc_t sum = 0;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) sum += static_cast<acc_t>(plane[h * si.h + w * si.w]);
          const bool empty = h0 >= h1 || w0 >= w1;  // as torch: an empty window gives 0, not 0/0
          const int64_t div = avg_divisor(hs, ws, g, count_include_pad, divisor_override);
          out[n * so.n + c * so.c + oh * so.h + ow * so.w] =
              static_cast<scalar_t>(empty ? acc_t(0) : sum / static_cast<acc_t>(div));
        }
      }
    });
  });
}

void avg_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& grad_input, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad,
                         int64_t divisor_override) {
  check_pool_tensor(grad_output, "grad_output");
  check_pool_tensor(grad_input, "grad_input");
  const std::vector<int64_t> one{1, 1};
  const Geometry g = geometry(grad_input, grad_output, kernel, stride, padding, one);
  const Strides4 sg(grad_output), si(grad_input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_avg_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.H * g.W);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / g.C, c = p % g.C;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int64_t hs = oh * g.sH - g.pH;
          const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + g.kH, g.H);
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const int64_t ws = ow * g.sW - g.pW;
            const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min(ws + g.kW, g.W);
            if (h0 >= h1 || w0 >= w1) continue;
            const acc_t v = static_cast<acc_t>(go[n * sg.n + c * sg.c + oh * sg.h + ow * sg.w]) /
                            static_cast<acc_t>(avg_divisor(hs, ws, g, count_include_pad, divisor_override));
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) acc[h * g.W + w] += v;
          }
        }
        scalar_t* plane = gi + n * si.n + c * si.c;
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) plane[h * si.h + w * si.w] = static_cast<scalar_t>(acc[h * g.W + w]);
      }
    });
  });
}

}  // namespace pyops
