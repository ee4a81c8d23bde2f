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

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

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

// Tasks of at least this many window reads each, so small inputs do not pay for threads.
constexpr int64_t kMinTaskWork = 16384;

inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(work_per_task, 1));
}

// Run f(n, c, oh_begin, oh_end) over all planes, splitting output rows when N*C alone
// cannot keep every thread busy.
template <typename F>
void for_each_plane_rows(const Geometry& g, const F& f) {
  const int64_t planes = g.N * g.C;
  const int64_t threads = at::get_num_threads();
  const int64_t row_split = planes >= threads ? 1 : std::min<int64_t>(g.OH, (threads + planes - 1) / planes);
  const int64_t rows_per = (g.OH + row_split - 1) / std::max<int64_t>(row_split, 1);
  const int64_t grain = grain_for(rows_per * g.OW * g.kH * g.kW);
  at::parallel_for(0, planes * row_split, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t plane = t / row_split, part = t % row_split;
      const int64_t r0 = part * rows_per, r1 = std::min(g.OH, r0 + rows_per);
      if (r0 < r1) f(plane / g.C, plane % g.C, r0, r1);
    }
  });
}

// True when t is stored (N, H, W, C) densely: the layout where C is the unit-stride
// dimension and the channels_last kernels below vectorise over it.
bool nhwc_dense(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && t.size(1) > 1;
}

inline int64_t first_valid(int64_t start, int64_t step) {
  // smallest start + k * step >= 0 (k >= 0)
  return start >= 0 ? start : start + ((-start + step - 1) / step) * step;
}


// ---- channels_last (NHWC) kernels: one (n, oh) output row per task, the channel loop
// innermost and unit-stride. The channel loops live in these small functions, whose
// by-value sizes and __restrict pointers let the compiler vectorise them (a loop bound
// read through a lambda's captured reference does not).

template <typename scalar_t, typename acc_t>
inline void max_update(const scalar_t* __restrict px, acc_t* __restrict best, int64_t* __restrict arg, int64_t C,
                       int64_t pos) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(px[c]);
    const bool take = (v > best[c]) | (v != v);
    best[c] = take ? v : best[c];
    arg[c] = take ? pos : arg[c];
  }
}

template <typename scalar_t, typename acc_t>
inline void add_to(const scalar_t* __restrict px, acc_t* __restrict acc, int64_t C, acc_t scale) {
  for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(px[c]) * scale;
}

template <typename scalar_t, typename acc_t>
inline void store_scaled(const acc_t* __restrict src, scalar_t* __restrict dst, int64_t C, acc_t scale) {
  for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(src[c] * scale);
}

void max_pool2d_forward_nhwc(const at::Tensor& input, const at::Tensor& output, const at::Tensor& indices,
                             const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_max_pool2d_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    const int64_t C = g.C;
    at::parallel_for(0, g.N * g.OH, grain_for(g.OW * C * g.kH * g.kW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> best(C);
      std::vector<int64_t> arg(C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        const int64_t hs = oh * g.sH - g.pH;
        const int64_t h0 = first_valid(hs, g.dH), h1 = std::min(hs + (g.kH - 1) * g.dH + 1, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t ws = ow * g.sW - g.pW;
          const int64_t w0 = first_valid(ws, g.dW), w1 = std::min(ws + (g.kW - 1) * g.dW + 1, g.W);
          acc_t* __restrict b = best.data();
          int64_t* __restrict a = arg.data();
          const int64_t first = h0 * g.W + w0;
          for (int64_t c = 0; c < C; ++c) {
            b[c] = -std::numeric_limits<acc_t>::infinity();
            a[c] = first;
          }
          for (int64_t h = h0; h < h1; h += g.dH) {
            for (int64_t w = w0; w < w1; w += g.dW) {
              max_update(in + ((n * g.H + h) * g.W + w) * C, b, a, C, h * g.W + w);
            }
          }
          const int64_t o = ((n * g.OH + oh) * g.OW + ow) * C;
          store_scaled(b, out + o, C, acc_t(1));
          std::copy(a, a + C, idx + o);
        }
      }
    });
  });
}

// Backward tasks are (n, channel block) pairs: each owns its slice of grad_input, so
// the scatter needs no atomics and runs in a fixed order (deterministic).
constexpr int64_t kChannelBlock = 64;

void max_pool2d_backward_nhwc(const at::Tensor& grad_output, const at::Tensor& indices,
                              const at::Tensor& grad_input) {
  const int64_t N = grad_input.size(0), C = grad_input.size(1), H = grad_input.size(2), W = grad_input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_max_pool2d_backward_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * blocks, grain_for(H * W * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * kChannelBlock, cb = std::min(kChannelBlock, C - c0);
        acc.assign(H * W * cb, acc_t(0));
        for (int64_t o = 0; o < OH * OW; ++o) {
          const int64_t* pi = idx + (n * OH * OW + o) * C + c0;
          const scalar_t* pg = go + (n * OH * OW + o) * C + c0;
          for (int64_t c = 0; c < cb; ++c) {
            const int64_t i = pi[c];
            if (i >= 0 && i < H * W) acc[i * cb + c] += static_cast<acc_t>(pg[c]);  // see below
          }
        }
        for (int64_t p = 0; p < H * W; ++p) store_scaled(acc.data() + p * cb, gi + (n * H * W + p) * C + c0, cb, acc_t(1));
      }
    });
  });
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
  if (nhwc_dense(input) && nhwc_dense(output) && nhwc_dense(indices)) {
    max_pool2d_forward_nhwc(input, output, indices, g);
    return;
  }
  const Strides4 si(input), so(output), sx(indices);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_max_pool2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    for_each_plane_rows(g, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
      // Local copies: the int64 stores below could alias the captured structs'
      // fields, which would force a reload of every loop bound after each store.
      const Geometry G = g;
      const Strides4 SI = si, SO = so, SX = sx;
      const scalar_t* plane = in + n * SI.n + c * SI.c;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t hs = oh * G.sH - G.pH;
        const int64_t h0 = first_valid(hs, G.dH);
        const int64_t h1 = std::min(hs + (G.kH - 1) * G.dH + 1, G.H);
        for (int64_t ow = 0; ow < G.OW; ++ow) {
          const int64_t ws = ow * G.sW - G.pW;
          const int64_t w0 = first_valid(ws, G.dW);
          const int64_t w1 = std::min(ws + (G.kW - 1) * G.dW + 1, G.W);
          // torch's rule: start from the window's first in-bounds position at -inf;
          // a strictly larger value or any NaN takes over (ties keep the first).
          int64_t best = h0 * G.W + w0;
          acc_t best_val = -std::numeric_limits<acc_t>::infinity();
          for (int64_t h = h0; h < h1; h += G.dH) {
            for (int64_t w = w0; w < w1; w += G.dW) {
              const acc_t v = static_cast<acc_t>(plane[h * SI.h + w * SI.w]);
              if (v > best_val || v != v) {  // v != v: NaN
                best_val = v;
                best = h * G.W + w;
              }
            }
          }
          out[n * SO.n + c * SO.c + oh * SO.h + ow * SO.w] = static_cast<scalar_t>(best_val);
          idx[n * SX.n + c * SX.c + oh * SX.h + ow * SX.w] = best;
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
  if (nhwc_dense(grad_output) && nhwc_dense(indices) && nhwc_dense(grad_input)) {
    max_pool2d_backward_nhwc(grad_output, indices, grad_input);
    return;
  }
  const Strides4 sg(grad_output), sx(indices), si(grad_input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_max_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    // A dense NCHW float/double plane accumulates in place; otherwise through a float buffer.
    const bool direct = std::is_same_v<acc_t, scalar_t> && si.w == 1 && si.h == W;
    at::parallel_for(0, N * C, grain_for(H * W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(direct ? 0 : H * W);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        scalar_t* plane = gi + n * si.n + c * si.c;
        acc_t* acc = direct ? reinterpret_cast<acc_t*>(plane) : buffer.data();
        std::fill(acc, acc + H * W, acc_t(0));
        // A window that lies wholly in the padding (possible with dilation) outputs -inf and,
        // as in torch, an index one past its last in-bounds start, which may fall outside the
        // plane: such an output depends on no input, so its gradient goes nowhere (torch's CPU
        // kernel writes it out of bounds).
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t* pi = idx + n * sx.n + c * sx.c + oh * sx.h;
          const scalar_t* pg = go + n * sg.n + c * sg.c + oh * sg.h;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t i = pi[ow * sx.w];
            if (i >= 0 && i < H * W) acc[i] += static_cast<acc_t>(pg[ow * sg.w]);
          }
        }
        if (!direct)
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) plane[h * si.h + w * si.w] = static_cast<scalar_t>(acc[h * W + w]);
      }
    });
  });
}

namespace {

// The average-pool window of output (oh, ow): the input rows [h0, h1) and columns
// [w0, w1) it sums, and the factor 1 / divisor with torch's divisor rule (0 for an
// empty window, which torch outputs as 0 rather than 0/0).
struct AvgWindow {
  int64_t h0, h1, w0, w1;
  double scale;
};

inline AvgWindow avg_window(int64_t oh, int64_t ow, const Geometry& g, bool count_include_pad,
                            int64_t divisor_override) {
  const int64_t hs = oh * g.sH - g.pH, ws = ow * g.sW - g.pW;
  const int64_t he = std::min(hs + g.kH, g.H + g.pH), we = std::min(ws + g.kW, g.W + g.pW);
  AvgWindow win{std::max<int64_t>(hs, 0), std::min(he, g.H), std::max<int64_t>(ws, 0), std::min(we, g.W), 0.0};
  if (win.h0 >= win.h1 || win.w0 >= win.w1) return win;
  const int64_t div = divisor_override != 0 ? divisor_override  // 0 stands for none
                      : count_include_pad   ? (he - hs) * (we - ws)
                                            : (win.h1 - win.h0) * (win.w1 - win.w0);
  win.scale = 1.0 / static_cast<double>(div);
  return win;
}


// Channels_last average pooling, laid out as the max-pool kernels above.
void avg_pool2d_forward_nhwc(const at::Tensor& input, const at::Tensor& output, const Geometry& g,
                             bool count_include_pad, int64_t divisor_override) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_avg_pool2d_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const int64_t C = g.C;
    at::parallel_for(0, g.N * g.OH, grain_for(g.OW * C * g.kH * g.kW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const AvgWindow win = avg_window(oh, ow, g, count_include_pad, divisor_override);
          acc_t* __restrict s = sum.data();
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t h = win.h0; h < win.h1; ++h)
            for (int64_t w = win.w0; w < win.w1; ++w) add_to(in + ((n * g.H + h) * g.W + w) * C, s, C, acc_t(1));
          const acc_t scale = static_cast<acc_t>(win.scale);
          store_scaled(s, out + ((n * g.OH + oh) * g.OW + ow) * C, C, scale);
        }
      }
    });
  });
}

void avg_pool2d_backward_nhwc(const at::Tensor& grad_output, const at::Tensor& grad_input, const Geometry& g,
                              bool count_include_pad, int64_t divisor_override) {
  const int64_t C = g.C, blocks = (C + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_avg_pool2d_backward_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * blocks, grain_for(g.H * g.W * std::min(C, kChannelBlock)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * kChannelBlock, cb = std::min(kChannelBlock, C - c0);
        acc.assign(g.H * g.W * cb, acc_t(0));
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const AvgWindow win = avg_window(oh, ow, g, count_include_pad, divisor_override);
            const acc_t scale = static_cast<acc_t>(win.scale);
            const scalar_t* pg = go + ((n * g.OH + oh) * g.OW + ow) * C + c0;
            for (int64_t h = win.h0; h < win.h1; ++h)
              for (int64_t w = win.w0; w < win.w1; ++w) add_to(pg, acc.data() + (h * g.W + w) * cb, cb, scale);
          }
        }
        for (int64_t p = 0; p < g.H * g.W; ++p)
          store_scaled(acc.data() + p * cb, gi + (n * g.H * g.W + p) * C + c0, cb, acc_t(1));
      }
    });
  });
}

}  // namespace

void avg_pool2d_forward(const at::Tensor& input, const at::Tensor& output, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad,
                        int64_t divisor_override) {
  check_pool_tensor(input, "input");
  check_pool_tensor(output, "output");
  const std::vector<int64_t> one{1, 1};
  const Geometry g = geometry(input, output, kernel, stride, padding, one);
  if (nhwc_dense(input) && nhwc_dense(output)) {
    avg_pool2d_forward_nhwc(input, output, g, count_include_pad, divisor_override);
    return;
  }
  const Strides4 si(input), so(output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_avg_pool2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    for_each_plane_rows(g, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
      // Local copies: the int64 stores below could alias the captured structs'
      // fields, which would force a reload of every loop bound after each store.
      const Geometry G = g;
      const Strides4 SI = si, SO = so;
      const scalar_t* plane = in + n * SI.n + c * SI.c;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = 0; ow < G.OW; ++ow) {
          const AvgWindow win = avg_window(oh, ow, G, count_include_pad, divisor_override);
          acc_t sum = 0;
          for (int64_t h = win.h0; h < win.h1; ++h)
            for (int64_t w = win.w0; w < win.w1; ++w) sum += static_cast<acc_t>(plane[h * SI.h + w * SI.w]);
          out[n * SO.n + c * SO.c + oh * SO.h + ow * SO.w] = static_cast<scalar_t>(sum * static_cast<acc_t>(win.scale));
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
  if (nhwc_dense(grad_output) && nhwc_dense(grad_input)) {
    avg_pool2d_backward_nhwc(grad_output, grad_input, g, count_include_pad, divisor_override);
    return;
  }
  const Strides4 sg(grad_output), si(grad_input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_avg_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.C, grain_for(g.H * g.W * g.kH * g.kW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(g.H * g.W);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / g.C, c = p % g.C;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const AvgWindow win = avg_window(oh, ow, g, count_include_pad, divisor_override);
            const acc_t v = static_cast<acc_t>(go[n * sg.n + c * sg.c + oh * sg.h + ow * sg.w]) *
                            static_cast<acc_t>(win.scale);
            for (int64_t h = win.h0; h < win.h1; ++h)
              for (int64_t w = win.w0; w < win.w1; ++w) acc[h * g.W + w] += v;
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
