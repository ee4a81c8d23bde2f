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
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "common.h"
#include "pooling.h"

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

// Split all planes' output rows into tasks (n, c, oh_begin, oh_end), splitting output
// rows when N*C alone cannot keep every thread busy, and run body once per worker
// chunk: body(tasks) sets up per-worker state, then tasks(f) calls f on each task.
template <typename Body>
void for_each_plane_chunk(const Geometry& g, const Body& body) {
  const int64_t planes = g.N * g.C;
  const int64_t threads = at::get_num_threads();
  const int64_t row_split = planes >= threads ? 1 : std::min<int64_t>(g.OH, (threads + planes - 1) / planes);
  const int64_t rows_per = (g.OH + row_split - 1) / std::max<int64_t>(row_split, 1);
  const int64_t grain = grain_for(rows_per * g.OW * g.kH * g.kW);
  at::parallel_for(0, planes * row_split, grain, [&](int64_t begin, int64_t end) {
    body([&](const auto& f) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t plane = t / row_split, part = t % row_split;
        const int64_t r0 = part * rows_per, r1 = std::min(g.OH, r0 + rows_per);
        if (r0 < r1) f(plane / g.C, plane % g.C, r0, r1);
      }
    });
  });
}

template <typename F>
void for_each_plane_rows(const Geometry& g, const F& f) {
  for_each_plane_chunk(g, [&](const auto& tasks) { tasks(f); });
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

// arg holds plane positions as int32 (the caller checks H * W fits) so the compare,
// the value blend and the position blend run in lanes of one width.
template <typename scalar_t, typename acc_t>
inline void max_update(const scalar_t* __restrict px, acc_t* __restrict best, int32_t* __restrict arg, int64_t C,
                       int32_t pos) {
#pragma omp simd
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

// acc[c] += px[p * step + c] for the pixels p < count in order, c < C: add_to over a run of
// pixels, each vector of sums loaded and stored once per run instead of once per pixel
// (the same additions in the same order). float and double; others pixel by pixel.
template <typename scalar_t, typename acc_t>
inline void add_pixels_to(const scalar_t* __restrict px, int64_t step, int64_t count, acc_t* __restrict acc,
                          int64_t C) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t VS = Vec::size();
    for (int64_t c = 0; c < C; c += VS) {
      const int64_t n = std::min<int64_t>(VS, C - c);
      Vec a = Vec::loadu(acc + c, n);
      for (int64_t p = 0; p < count; ++p) a = a + Vec::loadu(px + p * step + c, n);
      a.store(acc + c, n);
    }
  } else {
    for (int64_t p = 0; p < count; ++p) add_to(px + p * step, acc, C, acc_t(1));
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t row_sum(const scalar_t* __restrict px, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(px[i]);
  return sum;
}

template <typename scalar_t, typename acc_t>
inline void gather(const acc_t* __restrict src, const int32_t* __restrict index, scalar_t* __restrict dst,
                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[index[i]]);
}

inline void widen(const int32_t* __restrict src, int64_t* __restrict dst, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
}

template <typename scalar_t, typename acc_t>
inline void store_scaled(const acc_t* __restrict src, scalar_t* __restrict dst, int64_t C, acc_t scale) {
  for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(src[c] * scale);
}

// One window of channels_last pooling over a block of kBlock channels whose
// accumulators live in vector registers (a compile-time block size lets the compiler
// keep acc[] there instead of in memory between the window's pixels).
constexpr int64_t kBlock = 32;
// Larger windows (a global pool) go pixel by pixel over all channels instead, with the
// accumulators in L1: a block's walk over many pixels C elements apart defeats the caches.
constexpr int64_t kMaxBlockedWindow = 16;

template <typename scalar_t, typename acc_t>
inline void window_sum_block(const scalar_t* __restrict px, int64_t row_step, int64_t col_step, int64_t rows,
                             int64_t cols, acc_t scale, scalar_t* __restrict dst) {
  acc_t acc[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) acc[j] = acc_t(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) {
      const scalar_t* __restrict p = px + r * row_step + q * col_step;
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += static_cast<acc_t>(p[j]);
    }
  for (int64_t j = 0; j < kBlock; ++j) dst[j] = static_cast<scalar_t>(acc[j] * scale);
}

template <typename scalar_t, typename acc_t>
inline void window_max_block(const scalar_t* __restrict px, int64_t row_step, int64_t col_step, int64_t rows,
                             int64_t cols, int32_t first, int32_t row_pos_step, int32_t col_pos_step,
                             scalar_t* __restrict dst, int64_t* __restrict idx) {
  acc_t best[kBlock];
  int32_t arg[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) {
    best[j] = -std::numeric_limits<acc_t>::infinity();
    arg[j] = first;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) {
      const scalar_t* __restrict p = px + r * row_step + q * col_step;
      const int32_t pos = first + static_cast<int32_t>(r) * row_pos_step + static_cast<int32_t>(q) * col_pos_step;
      for (int64_t j = 0; j < kBlock; ++j) {
        const acc_t v = static_cast<acc_t>(p[j]);
        const bool take = (v > best[j]) | (v != v);
        best[j] = take ? v : best[j];
        arg[j] = take ? pos : arg[j];
      }
    }
  for (int64_t j = 0; j < kBlock; ++j) {
    dst[j] = static_cast<scalar_t>(best[j]);
    idx[j] = arg[j];
  }
}

void max_pool2d_forward_nhwc(const at::Tensor& input, const at::Tensor& output, const at::Tensor& indices,
                             const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_max_pool2d_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    const int64_t C = g.C;
    const bool blocked = g.kH * g.kW <= kMaxBlockedWindow;
    at::parallel_for(0, g.N * g.OH, grain_for(g.OW * C * g.kH * g.kW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> best(C);
      std::vector<int32_t> arg(C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        const int64_t hs = oh * g.sH - g.pH;
        const int64_t h0 = first_valid(hs, g.dH), h1 = std::min(hs + (g.kH - 1) * g.dH + 1, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t ws = ow * g.sW - g.pW;
          const int64_t w0 = first_valid(ws, g.dW), w1 = std::min(ws + (g.kW - 1) * g.dW + 1, g.W);
          const int64_t o = ((n * g.OH + oh) * g.OW + ow) * C;
          const int64_t rows = (h1 - h0 + g.dH - 1) / g.dH, cols = (w1 - w0 + g.dW - 1) / g.dW;
          const int32_t first = static_cast<int32_t>(h0 * g.W + w0);
          const scalar_t* corner = in + ((n * g.H + h0) * g.W + w0) * C;
          int64_t c0 = 0;
          for (; blocked && c0 + kBlock <= C; c0 += kBlock)
            window_max_block<scalar_t, acc_t>(corner + c0, g.dH * g.W * C, g.dW * C, rows, cols, first,
                                              static_cast<int32_t>(g.dH * g.W), static_cast<int32_t>(g.dW),
                                              out + o + c0, idx + o + c0);
          if (c0 < C) {  // the last channels, fewer than a block
            const int64_t cb = C - c0;
            acc_t* __restrict b = best.data();
            int32_t* __restrict a = arg.data();
            for (int64_t c = 0; c < cb; ++c) {
              b[c] = -std::numeric_limits<acc_t>::infinity();
              a[c] = first;
            }
            for (int64_t h = h0; h < h1; h += g.dH)
              for (int64_t w = w0; w < w1; w += g.dW)
                max_update(in + ((n * g.H + h) * g.W + w) * C + c0, b, a, cb, static_cast<int32_t>(h * g.W + w));
            store_scaled(b, out + o + c0, cb, acc_t(1));
            widen(a, idx + o + c0, cb);
          }
        }
      }
    });
  });
}

// The output windows [lo, hi] along one dimension whose span
// [o * stride - pad, o * stride - pad + (kernel - 1) * dilation] contains input
// position i (empty when lo > hi).
struct Covering {
  int64_t lo, hi;
};

inline Covering covering(int64_t i, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation, int64_t out) {
  const int64_t top = i + pad;                            // o * stride <= top
  const int64_t bottom = top - (kernel - 1) * dilation;   // o * stride >= bottom
  return {bottom <= 0 ? 0 : (bottom + stride - 1) / stride, std::min(out - 1, top / stride)};
}

template <typename scalar_t, typename acc_t>
inline void add_if_argmax(const scalar_t* __restrict pg, const int64_t* __restrict pi, acc_t* __restrict acc,
                          int64_t C, int64_t pos) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) acc[c] += pi[c] == pos ? static_cast<acc_t>(pg[c]) : acc_t(0);
}

// grad_input of one pixel over kBlock channels (accumulators in registers): the sum of
// the gradients of the covering windows whose argmax it is.
template <typename scalar_t, typename acc_t>
inline void gather_argmax_block(const scalar_t* __restrict pg, const int64_t* __restrict pi, int64_t row_step,
                                int64_t col_step, int64_t rows, int64_t cols, int64_t pos, scalar_t* __restrict dst) {
  acc_t acc[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) acc[j] = acc_t(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) {
      const int64_t o = r * row_step + q * col_step;
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += pi[o + j] == pos ? static_cast<acc_t>(pg[o + j]) : acc_t(0);
    }
  for (int64_t j = 0; j < kBlock; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
}

// grad_input of one pixel over kBlock channels: the sum of grad * factor of the
// covering windows (factor per window from the table).
template <typename scalar_t, typename acc_t>
inline void gather_avg_block(const scalar_t* __restrict pg, const acc_t* __restrict factors, int64_t row_step,
                             int64_t col_step, int64_t factor_row_step, int64_t rows, int64_t cols,
                             scalar_t* __restrict dst) {
  acc_t acc[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) acc[j] = acc_t(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) {
      const scalar_t* __restrict p = pg + r * row_step + q * col_step;
      const acc_t f = factors[r * factor_row_step + q];
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += static_cast<acc_t>(p[j]) * f;
    }
  for (int64_t j = 0; j < kBlock; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
}

// Channels_last backward as a gather: each input pixel sums, over the windows that
// cover it, the gradients of the channels whose max it is. Every grad_input element is
// written once, with no zeroing pass, in a fixed order (deterministic), vectorised over
// channels. An index outside the plane (a window wholly in the padding, see the NCHW
// kernel) equals no position, so its gradient goes nowhere.
template <typename scalar_t>
inline void scatter_argmax(const scalar_t* __restrict pg, const int64_t* __restrict pi, scalar_t* __restrict gi,
                           int64_t C, int64_t plane) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const int64_t i = pi[c];
    if (i >= 0 && i < plane) gi[i * C + c] += pg[c];
  }
}

void max_pool2d_backward_nhwc(const at::Tensor& grad_output, const at::Tensor& indices,
                              const at::Tensor& grad_input, const Geometry& g) {
  // With enough images for every thread: each image is zeroed and its window gradients
  // scattered to their argmax (one read of the gradient and indices, where the gather
  // re-reads them for every window covering a pixel, up to 4x for the ResNet stem); in
  // image order, so deterministic. float and double only (half types accumulate in float
  // through the gather below, which also serves batches smaller than the thread count).
  if (g.N >= at::get_num_threads() &&
      (grad_input.scalar_type() == at::kFloat || grad_input.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "pyops_max_pool2d_backward_nhwc_scatter", [&] {
      const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
      const int64_t* idx = indices.const_data_ptr<int64_t>();
      scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
      const int64_t C = g.C, plane = g.H * g.W, outs = g.OH * g.OW;
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          scalar_t* gin = gi + n * plane * C;
          std::fill(gin, gin + plane * C, scalar_t(0));
          for (int64_t o = 0; o < outs; ++o)
            scatter_argmax(go + (n * outs + o) * C, idx + (n * outs + o) * C, gin, C, plane);
        }
      });
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_max_pool2d_backward_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    const int64_t C = g.C;
    const int64_t reads = std::max<int64_t>(1, (g.kH * g.kW) / (g.sH * g.sW));
    at::parallel_for(0, g.N * g.H, grain_for(g.W * C * reads), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.H, h = t % g.H;
        const Covering rows = covering(h, g.kH, g.sH, g.pH, g.dH, g.OH);
        for (int64_t w = 0; w < g.W; ++w) {
          const Covering cols = covering(w, g.kW, g.sW, g.pW, g.dW, g.OW);
          const int64_t pos = h * g.W + w;
          const int64_t first = ((n * g.OH + rows.lo) * g.OW + cols.lo) * C;
          const int64_t nrows = rows.hi - rows.lo + 1, ncols = cols.hi - cols.lo + 1;
          scalar_t* dst = gi + ((n * g.H + h) * g.W + w) * C;
          int64_t c0 = 0;
          for (; c0 + kBlock <= C; c0 += kBlock)
            gather_argmax_block<scalar_t, acc_t>(go + first + c0, idx + first + c0, g.OW * C, C, nrows, ncols, pos,
                                                 dst + c0);
          if (c0 < C) {  // the last channels, fewer than a block
            acc_t* __restrict a = acc.data();
            std::fill(a, a + (C - c0), acc_t(0));
            for (int64_t oh = rows.lo; oh <= rows.hi; ++oh)
              for (int64_t ow = cols.lo; ow <= cols.hi; ++ow) {
                const int64_t o = ((n * g.OH + oh) * g.OW + ow) * C + c0;
                add_if_argmax(go + o, idx + o, a, C - c0, pos);
              }
            store_scaled(a, dst + c0, C - c0, acc_t(1));
          }
        }
      }
    });
  });
}

// Average pooling sums the input rows [h0, h1) and columns [w0, w1) of output (oh, ow)'s
// window clipped to the input, and multiplies by 1 / divisor with torch's divisor rule.
// The factors depend only on (oh, ow), so they are computed once per call into a table
// that every plane shares (no division in the kernels); an empty window gets 0, which
// torch outputs as 0 rather than 0/0.
inline int64_t window_begin(int64_t o, int64_t stride, int64_t pad) { return std::max<int64_t>(o * stride - pad, 0); }
inline int64_t window_end(int64_t o, int64_t kernel, int64_t stride, int64_t pad, int64_t size) {
  return std::min(o * stride - pad + kernel, size);
}

template <typename acc_t>
std::vector<acc_t> avg_scales(const Geometry& g, bool count_include_pad, int64_t divisor_override) {
  std::vector<acc_t> scales(g.OH * g.OW);
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const int64_t hs = oh * g.sH - g.pH, he = std::min(hs + g.kH, g.H + g.pH);
    const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min(he, g.H);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t ws = ow * g.sW - g.pW, we = std::min(ws + g.kW, g.W + g.pW);
      const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min(we, g.W);
      double scale = 0.0;
      if (h0 < h1 && w0 < w1) {
        const int64_t div = divisor_override != 0 ? divisor_override  // 0 stands for none
                            : count_include_pad   ? (he - hs) * (we - ws)
                                                  : (h1 - h0) * (w1 - w0);
        scale = 1.0 / static_cast<double>(div);
      }
      scales[oh * g.OW + ow] = static_cast<acc_t>(scale);
    }
  }
  return scales;
}

// ---- NCHW forward through phase-split rows. Along a row, output ow's tap kw reads
// padded column ow * sW + kw * dW: split into sW phases (phase r holds padded columns
// r, r + sW, r + 2 sW, ...), every tap is a unit-stride run of its phase, so the
// reductions below vectorise over output columns whatever the stride. Padding is
// filled with the reduction's identity (-inf: never taken by the max; 0 for the sum).
// The windows are separable: each input row is reduced along its columns once (into a
// ring of the last window-span rows), and each output row combines its window's rows.
// Orders are torch's: rows top to bottom, columns left to right, a strictly larger
// value or a NaN taking over, so ties and NaN pick the position torch picks.

// How one input row splits into sW phases of L elements (phase r at r * L): position j
// of phase r is input column j * sW + r - pad, inside the row for j in [begin[r], end[r])
// and fill elsewhere. The bounds depend only on the geometry, so they are computed once.
class RowSplit {
 public:
  RowSplit(int64_t W, int64_t sW, int64_t pad, int64_t L) : sW_(sW), pad_(pad), L_(L), begin_(sW), end_(sW) {
    for (int64_t r = 0; r < sW; ++r) {
      const int64_t off = r - pad;  // column of position 0
      begin_[r] = std::min(L, off >= 0 ? int64_t{0} : (-off + sW - 1) / sW);
      end_[r] = std::clamp(W - off > 0 ? (W - off + sW - 1) / sW : int64_t{0}, begin_[r], L);
    }
  }

  // Copy row src (element stride sw) into dst's phases.
  template <typename scalar_t, typename acc_t>
  void operator()(const scalar_t* __restrict src, int64_t sw, acc_t fill, acc_t* __restrict dst) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (sW_ == 2 && sw == 1) return split_pairs(src, fill, dst);
    }
    const int64_t step = sW_ * sw;
    for (int64_t r = 0; r < sW_; ++r) {
      acc_t* __restrict d = dst + r * L_;
      const int64_t j0 = begin_[r], j1 = end_[r];
      std::fill(d, d + j0, fill);
      const scalar_t* __restrict s = src + (j0 * sW_ + r - pad_) * sw;
      if (step == 1) {
        for (int64_t j = j0; j < j1; ++j) d[j] = static_cast<acc_t>(s[j - j0]);
      } else if (step == 2) {  // stride-2 pooling of a dense row: a constant stride the compiler vectorises
        for (int64_t j = j0; j < j1; ++j) d[j] = static_cast<acc_t>(s[2 * (j - j0)]);
      } else {
        for (int64_t j = j0; j < j1; ++j) d[j] = static_cast<acc_t>(s[(j - j0) * step]);
      }
      std::fill(d + j1, d + L_, fill);
    }
  }

 private:
  // Stride 2 over a dense row: where both phases read, a vector deinterleave of column
  // pairs; the ends element by element.
  template <typename T>
  void split_pairs(const T* __restrict src, T fill, T* __restrict dst) const {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t VS = Vec::size();
    const int64_t j0 = std::max(begin_[0], begin_[1]), j1 = std::min(end_[0], end_[1]);
    int64_t j = j0;
    for (; j + VS <= j1; j += VS) {  // phase r, position j: column 2j + r - pad
      const T* s = src + 2 * j - pad_;
      const auto [even, odd] = at::vec::deinterleave2(Vec::loadu(s), Vec::loadu(s + VS));
      even.store(dst + j);
      odd.store(dst + L_ + j);
    }
    for (int64_t r = 0; r < 2; ++r) {
      T* d = dst + r * L_;
      std::fill(d, d + begin_[r], fill);
      for (int64_t i = begin_[r]; i < std::min(j0, end_[r]); ++i) d[i] = src[2 * i + r - pad_];
      for (int64_t i = std::max(j, begin_[r]); i < end_[r]; ++i) d[i] = src[2 * i + r - pad_];
      std::fill(d + end_[r], d + L_, fill);
    }
  }

  const int64_t sW_, pad_, L_;
  std::vector<int64_t> begin_, end_;
};

// The row loops below run over n, a multiple of kLanes, in blocks of kLanes: whole
// vectors with no scalar remainder (whose compare-and-branch code mispredicts on data).
// The lanes past the row's outputs compute junk that is never stored.
constexpr int64_t kLanes = 16;

inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// best/pos over n outputs against candidates v[i] at positions base + i * step. The
// positions are the block's first plus a 32-bit lane offset: from the 64-bit i, GCC
// assembled each block's lane indices from scalars (twenty instructions per vector).
template <typename acc_t>
inline void max_run(const acc_t* __restrict v, int64_t n, int32_t base, int32_t step, acc_t* __restrict best,
                    int32_t* __restrict pos) {
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int32_t first = base + static_cast<int32_t>(i0) * step;
    for (int32_t j = 0; j < kLanes; ++j) {
      const int64_t i = i0 + j;
      const bool take = (v[i] > best[i]) | (v[i] != v[i]);
      best[i] = take ? v[i] : best[i];
      pos[i] = take ? first + j * step : pos[i];
    }
  }
}

// best/pos over n outputs against candidates v[i] at positions base + at[i]. at[i] is read
// whether or not it is taken: as `take ? base + at[i] : pos[i]`, GCC made it a masked load
// merging into a register it kept on the stack, a store-to-load chain through every block.
template <typename acc_t>
inline void max_rows(const acc_t* __restrict v, const int32_t* __restrict at, int64_t n, int32_t base,
                     acc_t* __restrict best, int32_t* __restrict pos) {
  for (int64_t i0 = 0; i0 < n; i0 += kLanes)
    for (int64_t i = i0; i < i0 + kLanes; ++i) {
      const int32_t cand = base + at[i];
      const bool take = (v[i] > best[i]) | (v[i] != v[i]);
      best[i] = take ? v[i] : best[i];
      pos[i] = take ? cand : pos[i];
    }
}

// out[i] = sum over k < count of runs[k][i] (in k order) times scale[i] (scale may be null),
// for i < n, each vector's sum in a register. at::vec by hand: as `acc[i] += v[i]` loops,
// inlined into the row loops, the sums lost their __restrict, ran as scalar code and
// re-read each partial sum from memory (half an NCHW average pool's time).
template <typename scalar_t, typename acc_t>
inline void sum_runs(const acc_t* const* runs, int64_t count, int64_t n, const acc_t* __restrict scale,
                     scalar_t* __restrict out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t VS = Vec::size();
  for (int64_t i = 0; i < n; i += VS) {
    Vec acc(acc_t(0));
    for (int64_t k = 0; k < count; ++k) acc = acc + Vec::loadu(runs[k] + i);
    if (scale != nullptr) acc = acc * Vec::loadu(scale + i, std::min<int64_t>(VS, n - i));
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      acc.store(out + i, std::min<int64_t>(VS, n - i));
    } else {
      alignas(64) acc_t lanes[VS];
      acc.store(lanes);
      for (int64_t j = 0; j < std::min<int64_t>(VS, n - i); ++j) out[i + j] = static_cast<scalar_t>(lanes[j]);
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void store_max(const acc_t* __restrict best, const int32_t* __restrict pos, int64_t n, scalar_t* __restrict out,
                      int64_t* __restrict idx) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(best[i]);
    idx[i] = pos[i];
  }
}


// Use the phase-split kernels when rows are long enough to vectorise and plane
// positions fit the int32 lanes (with room for the junk lanes past the row's end, whose
// positions run less than kLanes * sW + 2 * kW * dW columns past the plane's last row).
bool use_row_phases(const Geometry& g) {
  return g.OW >= 4 && (g.H + 1) * g.W + kLanes * g.sW + 2 * g.kW * g.dW <= std::numeric_limits<int32_t>::max();
}

// One plane's output rows [oh0, oh1) of max pooling (kMax) or the window sums times
// scales (average pooling), any input and output strides.
template <bool kMax, typename scalar_t, typename acc_t>
class RowPhasePool {
 public:
  explicit RowPhasePool(const Geometry& g)
      : g_(g),
        n_(round_up_lanes(g.OW)),
        L_(n_ + ((g.kW - 1) * g.dW) / g.sW),
        slots_(ring_slots((g.kH - 1) * g.dH + 1)),
        split_(g.W, g.sW, g.pW, L_),
        phases_(g.sW * L_),
        ring_(slots_ * n_),
        ring_pos_(kMax ? slots_ * n_ : 0),
        ring_row_(slots_, -1),
        best_(n_),
        runs_(g.kH),
        tap_runs_(g.kW),
        pos_(kMax ? n_ : 0),
        first_col_(kMax ? n_ : 0) {
    for (int64_t ow = 0; ow < (kMax ? g.OW : 0); ++ow)
      first_col_[ow] = static_cast<int32_t>(first_valid(ow * g.sW - g.pW, g.dW));
  }

  // scales: average pooling's per-output factors (OH * OW); out/idx: the plane's
  // outputs with strides so (idx unused for the average).
  void run(const scalar_t* plane, const Strides4& si, int64_t oh0, int64_t oh1, const acc_t* scales,
           scalar_t* out, const Strides4& so, int64_t* idx, const Strides4& sx) {
    const Geometry& g = g_;
    std::fill(ring_row_.begin(), ring_row_.end(), -1);
    const bool dense_out = so.w == 1 && (!kMax || sx.w == 1);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const int64_t hs = oh * g.sH - g.pH;
      const int64_t h0 = first_valid(hs, g.dH), h1 = std::min(hs + (g.kH - 1) * g.dH + 1, g.H);
      acc_t* best = best_.data();
      if constexpr (kMax) {
        std::fill(best, best + n_, -std::numeric_limits<acc_t>::infinity());
        const int32_t start = static_cast<int32_t>(h0 * g.W);
        for (int64_t ow = 0; ow < n_; ++ow) pos_[ow] = start + first_col_[ow];
      }
      int64_t rows = 0;
      for (int64_t h = h0; h < h1; h += g.dH) {
        const int64_t slot = reduce_row(plane, si, h);
        if constexpr (kMax) {
          max_rows(ring_.data() + slot * n_, ring_pos_.data() + slot * n_, n_, static_cast<int32_t>(h * g.W), best,
                   pos_.data());
        } else {
          runs_[rows++] = ring_.data() + slot * n_;
        }
      }
      if constexpr (kMax) {
        if (dense_out) {
          store_max(best, pos_.data(), g.OW, out + oh * so.h, idx + oh * sx.h);
        } else {
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            out[oh * so.h + ow * so.w] = static_cast<scalar_t>(best[ow]);
            idx[oh * sx.h + ow * sx.w] = pos_[ow];
          }
        }
      } else {
        const acc_t* f = scales + oh * g.OW;
        if (dense_out) {
          sum_runs(runs_.data(), rows, g.OW, f, out + oh * so.h);
        } else {
          sum_runs<acc_t, acc_t>(runs_.data(), rows, n_, nullptr, best);
          for (int64_t ow = 0; ow < g.OW; ++ow) out[oh * so.h + ow * so.w] = static_cast<scalar_t>(best[ow] * f[ow]);
        }
      }
    }
  }

 private:
  static int64_t ring_slots(int64_t span) {
    int64_t slots = 1;
    while (slots < span) slots *= 2;
    return slots;
  }

  // The ring slot holding input row h reduced along its columns (computed on first use).
  int64_t reduce_row(const scalar_t* plane, const Strides4& si, int64_t h) {
    const Geometry& g = g_;
    const int64_t slot = h & (slots_ - 1);
    if (ring_row_[slot] == h) return slot;
    ring_row_[slot] = h;
    const acc_t fill = kMax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
    split_(plane + h * si.h, si.w, fill, phases_.data());
    acc_t* v = ring_.data() + slot * n_;
    if constexpr (!kMax) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const int64_t tap = kw * g.dW;
        tap_runs_[kw] = phases_.data() + (tap % g.sW) * L_ + tap / g.sW;
      }
      sum_runs<acc_t, acc_t>(tap_runs_.data(), g.kW, n_, nullptr, v);
      return slot;
    }
    std::fill(v, v + n_, fill);
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      const int64_t tap = kw * g.dW;
      const acc_t* run = phases_.data() + (tap % g.sW) * L_ + tap / g.sW;
      max_run(run, n_, static_cast<int32_t>(tap - g.pW), static_cast<int32_t>(g.sW), v, ring_pos_.data() + slot * n_);
    }
    return slot;
  }

  const Geometry g_;
  // n_: OW rounded up to whole vectors; slots_: the ring's rows, a power of two >= the
  // window's row span, so the rows of one window sit in distinct slots h mod slots_.
  const int64_t n_, L_, slots_;
  const RowSplit split_;
  std::vector<acc_t> phases_, ring_;
  std::vector<int32_t> ring_pos_;
  std::vector<int64_t> ring_row_;
  std::vector<acc_t> best_;
  // average pooling: the ring rows of one output row, the phase runs of one ring row
  std::vector<const acc_t*> runs_, tap_runs_;
  std::vector<int32_t> pos_, first_col_;
};

// 2x2 windows with stride 2 and no padding, wholly inside the input (the common
// downsampling layer), float and double, unit-stride rows: each output row reads its two
// input rows once, split into even and odd columns by vector deinterleaves. The sums and
// the max are taken in the general kernel's order (columns, then rows; a strictly larger
// value or a NaN takes over), so results and indices are the same.
bool pairs_2x2(const Geometry& g, const at::Tensor& input, std::initializer_list<const at::Tensor*> outs) {
  bool ok = g.kH == 2 && g.kW == 2 && g.sH == 2 && g.sW == 2 && g.pH == 0 && g.pW == 0 && g.dH == 1 &&
            g.dW == 1 && 2 * g.OH <= g.H && 2 * g.OW <= g.W && input.stride(3) == 1 &&
            (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
  for (const at::Tensor* t : outs) ok = ok && t->stride(3) == 1;
  return ok;
}

template <bool kMax>
void pairs_2x2_forward(const at::Tensor& input, const at::Tensor& output, const at::Tensor* indices,
                       const Geometry& g, bool count_include_pad, int64_t divisor_override) {
  const Strides4 si(input), so(output), sx(indices ? *indices : output);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyops_pool2d_pairs", [&] {
    using T = scalar_t;
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t VS = Vec::size();
    const std::vector<T> scales = kMax ? std::vector<T>() : avg_scales<T>(g, count_include_pad, divisor_override);
    const T* in = input.const_data_ptr<T>();
    T* out = output.mutable_data_ptr<T>();
    int64_t* idx = indices ? indices->mutable_data_ptr<int64_t>() : nullptr;
    for_each_plane_rows(g, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
      const Geometry G = g;
      const T* plane = in + n * si.n + c * si.c;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const T* r0 = plane + 2 * oh * si.h;
        const T* r1 = r0 + si.h;
        T* orow = out + n * so.n + c * so.c + oh * so.h;
        for (int64_t ow = 0; ow < G.OW; ow += VS) {
          const int64_t cnt = std::min(VS, G.OW - ow);  // outputs; 2 * cnt inputs per row
          const int64_t lo = std::min(VS, 2 * cnt), hi = 2 * cnt - lo;
          const auto load_pair = [&](const T* row) {
            return at::vec::deinterleave2(lo == VS ? Vec::loadu(row + 2 * ow) : Vec::loadu(row + 2 * ow, lo),
                                          hi == VS ? Vec::loadu(row + 2 * ow + VS) : Vec::loadu(row + 2 * ow + VS, hi));
          };
          const auto [a, b] = load_pair(r0);
          const auto [c2, d] = load_pair(r1);
          if constexpr (kMax) {
            Vec best = a, code(T(0));
            const Vec cand[3] = {b, c2, d};
            for (int k = 0; k < 3; ++k) {
              const Vec take = (cand[k] > best) | (cand[k] != cand[k]);
              best = Vec::blendv(best, cand[k], take);
              code = Vec::blendv(code, Vec(T(k + 1)), take);
            }
            best.store(orow + ow, cnt);
            alignas(64) T codes[VS];
            code.store(codes);
            int64_t* irow = idx + n * sx.n + c * sx.c + oh * sx.h;
            for (int64_t j = 0; j < cnt; ++j) {
              const int64_t k = static_cast<int64_t>(codes[j]);
              irow[ow + j] = (2 * oh + (k >> 1)) * G.W + 2 * (ow + j) + (k & 1);
            }
          } else {
            const Vec sum = ((a + b) + (c2 + d)) * Vec::loadu(scales.data() + oh * G.OW + ow, cnt);
            sum.store(orow + ow, cnt);
          }
        }
      }
    });
  });
}

// Run RowPhasePool over all planes; the workers' scratch is made once per chunk.
template <bool kMax>
void row_phase_forward(const at::Tensor& input, const at::Tensor& output, const at::Tensor* indices, const Geometry& g,
                       bool count_include_pad, int64_t divisor_override) {
  const Strides4 si(input), so(output), sx(indices ? *indices : output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_pool2d_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales =
        kMax ? std::vector<acc_t>() : avg_scales<acc_t>(g, count_include_pad, divisor_override);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices ? indices->mutable_data_ptr<int64_t>() : nullptr;
    for_each_plane_chunk(g, [&](const auto& for_each_task) {
      RowPhasePool<kMax, scalar_t, acc_t> pool(g);
      for_each_task([&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
        pool.run(in + n * si.n + c * si.c, si, oh0, oh1, scales.data(), out + n * so.n + c * so.c, so,
                 idx ? idx + n * sx.n + c * sx.c : nullptr, sx);
      });
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
  if (nhwc_dense(input) && nhwc_dense(output) && nhwc_dense(indices) &&
      g.H * g.W <= std::numeric_limits<int32_t>::max()) {
    max_pool2d_forward_nhwc(input, output, indices, g);
    return;
  }
  if (pairs_2x2(g, input, {&output, &indices})) {
    pairs_2x2_forward<true>(input, output, &indices, g, false, 0);
    return;
  }
  if (use_row_phases(g)) {
    row_phase_forward<true>(input, output, &indices, g, false, 0);
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

void max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& grad_input,
                         at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  check_pool_tensor(grad_output, "grad_output");
  check_pool_tensor(indices, "indices");
  check_pool_tensor(grad_input, "grad_input");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), "grad_output and indices must have the same shape");
  const Geometry g = geometry(grad_input, grad_output, kernel, stride, padding, dilation);
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  if (nhwc_dense(grad_output) && nhwc_dense(indices) && nhwc_dense(grad_input)) {
    max_pool2d_backward_nhwc(grad_output, indices, grad_input, g);
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

// Channels_last average pooling: one (n, oh) output row per task, channels innermost.
void avg_pool2d_forward_nhwc(const at::Tensor& input, const at::Tensor& output, const Geometry& g,
                             bool count_include_pad, int64_t divisor_override) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_avg_pool2d_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales = avg_scales<acc_t>(g, count_include_pad, divisor_override);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const int64_t C = g.C;
    const bool blocked = g.kH * g.kW <= kMaxBlockedWindow;
    at::parallel_for(0, g.N * g.OH, grain_for(g.OW * C * g.kH * g.kW), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        const int64_t h0 = window_begin(oh, g.sH, g.pH), h1 = window_end(oh, g.kH, g.sH, g.pH, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t w0 = window_begin(ow, g.sW, g.pW), w1 = window_end(ow, g.kW, g.sW, g.pW, g.W);
          const acc_t scale = scales[oh * g.OW + ow];
          const scalar_t* corner = in + ((n * g.H + h0) * g.W + w0) * C;
          scalar_t* dst = out + ((n * g.OH + oh) * g.OW + ow) * C;
          const int64_t rows = std::max<int64_t>(h1 - h0, 0), cols = std::max<int64_t>(w1 - w0, 0);
          int64_t c0 = 0;
          for (; blocked && c0 + kBlock <= C; c0 += kBlock)
            window_sum_block<scalar_t, acc_t>(corner + c0, g.W * C, C, rows, cols, scale, dst + c0);
          if (c0 < C) {  // the last channels, fewer than a block
            acc_t* __restrict s = sum.data();
            std::fill(s, s + (C - c0), acc_t(0));
            for (int64_t h = h0; h < h1; ++h)
              add_pixels_to(in + ((n * g.H + h) * g.W + w0) * C + c0, C, w1 - w0, s, C - c0);
            store_scaled(s, dst + c0, C - c0, scale);
          }
        }
      }
    });
  });
}

// Channels_last backward as a gather, like max pooling's: each input pixel sums
// grad * factor over the windows that cover it, written once, vectorised over channels.
void avg_pool2d_backward_nhwc(const at::Tensor& grad_output, const at::Tensor& grad_input, const Geometry& g,
                              bool count_include_pad, int64_t divisor_override) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_avg_pool2d_backward_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales = avg_scales<acc_t>(g, count_include_pad, divisor_override);
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    const int64_t C = g.C;
    const int64_t reads = std::max<int64_t>(1, (g.kH * g.kW) / (g.sH * g.sW));
    at::parallel_for(0, g.N * g.H, grain_for(g.W * C * reads), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / g.H, h = t % g.H;
        const Covering rows = covering(h, g.kH, g.sH, g.pH, 1, g.OH);
        for (int64_t w = 0; w < g.W; ++w) {
          const Covering cols = covering(w, g.kW, g.sW, g.pW, 1, g.OW);
          const int64_t first = ((n * g.OH + rows.lo) * g.OW + cols.lo) * C;
          const int64_t nrows = rows.hi - rows.lo + 1, ncols = cols.hi - cols.lo + 1;
          const acc_t* factors = scales.data() + rows.lo * g.OW + cols.lo;
          scalar_t* dst = gi + ((n * g.H + h) * g.W + w) * C;
          int64_t c0 = 0;
          for (; c0 + kBlock <= C; c0 += kBlock)
            gather_avg_block<scalar_t, acc_t>(go + first + c0, factors, g.OW * C, C, g.OW, nrows, ncols, dst + c0);
          if (c0 < C) {  // the last channels, fewer than a block
            acc_t* __restrict a = acc.data();
            std::fill(a, a + (C - c0), acc_t(0));
            for (int64_t oh = rows.lo; oh <= rows.hi; ++oh)
              for (int64_t ow = cols.lo; ow <= cols.hi; ++ow)
                add_to(go + ((n * g.OH + oh) * g.OW + ow) * C + c0, a, C - c0, scales[oh * g.OW + ow]);
            store_scaled(a, dst + c0, C - c0, acc_t(1));
          }
        }
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
  if (pairs_2x2(g, input, {&output})) {
    pairs_2x2_forward<false>(input, output, nullptr, g, count_include_pad, divisor_override);
    return;
  }
  if (use_row_phases(g)) {
    row_phase_forward<false>(input, output, nullptr, g, count_include_pad, divisor_override);
    return;
  }
  const Strides4 si(input), so(output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "pyops_avg_pool2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales = avg_scales<acc_t>(g, count_include_pad, divisor_override);
    const acc_t* factors = scales.data();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    for_each_plane_rows(g, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
      // Local copies: the stores below could alias the captured structs' fields,
      // which would force a reload of every loop bound after each store.
      const Geometry G = g;
      const Strides4 SI = si, SO = so;
      const scalar_t* plane = in + n * SI.n + c * SI.c;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t h0 = window_begin(oh, G.sH, G.pH), h1 = window_end(oh, G.kH, G.sH, G.pH, G.H);
        for (int64_t ow = 0; ow < G.OW; ++ow) {
          const int64_t w0 = window_begin(ow, G.sW, G.pW), w1 = window_end(ow, G.kW, G.sW, G.pW, G.W);
          acc_t sum = 0;
          if (SI.w == 1 && SI.h == G.W && w0 == 0 && w1 == G.W) {  // whole rows, one run (a global pool)
            sum = row_sum<scalar_t, acc_t>(plane + h0 * G.W, (h1 - h0) * G.W);
          } else if (SI.w == 1 && w1 - w0 >= 8) {  // long unit-stride rows: vectorised sums
            for (int64_t h = h0; h < h1; ++h) sum += row_sum<scalar_t, acc_t>(plane + h * SI.h + w0, w1 - w0);
          } else {
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) sum += static_cast<acc_t>(plane[h * SI.h + w * SI.w]);
          }
          out[n * SO.n + c * SO.c + oh * SO.h + ow * SO.w] = static_cast<scalar_t>(sum * factors[oh * G.OW + ow]);
        }
      }
    });
  });
}

// NCHW backward, in a fixed order with each grad_input element written once.
//  - Windows that do not overlap (kernel <= stride, e.g. 2x2/2 or a global pool): every
//    input element lies in at most one window, found through a position -> window table
//    shared by all planes, so each plane is one flat gather of grad * factor (no
//    per-row loop overhead, which dominates small planes).
//  - Otherwise two separable steps: u[oh][w] sums grad * factor over the windows of
//    output row oh that cover column w (a scatter along the row), then grad_input row h
//    sums u over the output rows that cover h (whole rows, vectorised).
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
  const bool disjoint = g.kH <= g.sH && g.kW <= g.sW && g.H * g.W <= (int64_t{1} << 22) &&
                        g.OH * g.OW < std::numeric_limits<int32_t>::max();
  std::vector<int32_t> window_of;  // disjoint windows: the window of each input position, or OH * OW (none)
  if (disjoint) {
    window_of.assign(g.H * g.W, static_cast<int32_t>(g.OH * g.OW));
    for (int64_t oh = 0; oh < g.OH; ++oh)
      for (int64_t h = window_begin(oh, g.sH, g.pH); h < window_end(oh, g.kH, g.sH, g.pH, g.H); ++h)
        for (int64_t ow = 0; ow < g.OW; ++ow)
          for (int64_t w = window_begin(ow, g.sW, g.pW); w < window_end(ow, g.kW, g.sW, g.pW, g.W); ++w)
            window_of[h * g.W + w] = static_cast<int32_t>(oh * g.OW + ow);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_input.scalar_type(), "pyops_avg_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales = avg_scales<acc_t>(g, count_include_pad, divisor_override);
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    const int64_t reads = std::max<int64_t>(1, g.kH / g.sH);
    at::parallel_for(0, g.N * g.C, grain_for(g.H * g.W * reads), [&](int64_t begin, int64_t end) {
      const Geometry G = g;
      const Strides4 SG = sg, SI = si;
      const bool dense_plane = SI.w == 1 && SI.h == G.W;
      // u: one row per output row, each input column's sum of its windows' scaled gradients
      // (+ a vector's slack: sum_runs reads whole vectors); vp: a row of scaled gradients
      // between zeros, for stride 1
      constexpr int64_t VS = at::vec::Vectorized<acc_t>::size();
      std::vector<acc_t> u(disjoint ? G.OH * G.OW + 1 : G.OH * G.W + VS), row(G.W);
      std::vector<acc_t> vp(G.sW == 1 ? std::max(G.OW, G.W + G.pW) + 2 * G.kW + VS : 0);
      std::vector<const acc_t*> runs(std::max(G.kW, G.kH + 1));
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / G.C, c = p % G.C;
        const scalar_t* gplane = go + n * SG.n + c * SG.c;
        scalar_t* plane = gi + n * SI.n + c * SI.c;
        if (disjoint) {
          acc_t* __restrict scaled = u.data();
          for (int64_t oh = 0; oh < G.OH; ++oh)
            for (int64_t ow = 0; ow < G.OW; ++ow)
              scaled[oh * G.OW + ow] = static_cast<acc_t>(gplane[oh * SG.h + ow * SG.w]) * scales[oh * G.OW + ow];
          scaled[G.OH * G.OW] = acc_t(0);
          if (dense_plane) {
            gather(scaled, window_of.data(), plane, G.H * G.W);
          } else {
            for (int64_t h = 0; h < G.H; ++h)
              for (int64_t w = 0; w < G.W; ++w)
                plane[h * SI.h + w * SI.w] = static_cast<scalar_t>(scaled[window_of[h * G.W + w]]);
          }
          continue;
        }
        if (G.sW == 1) {
          // Stride 1: column w sums v[w + pW - kw] over kw, as shifted runs of the padded row
          // added in increasing ow (the order of the general loop below), in registers.
          for (int64_t oh = 0; oh < G.OH; ++oh) {
            std::fill(vp.begin(), vp.end(), acc_t(0));
            for (int64_t ow = 0; ow < G.OW; ++ow)
              vp[G.kW - 1 + ow] = static_cast<acc_t>(gplane[oh * SG.h + ow * SG.w]) * scales[oh * G.OW + ow];
            for (int64_t kw = 0; kw < G.kW; ++kw) runs[kw] = vp.data() + G.pW + kw;
            sum_runs<acc_t, acc_t>(runs.data(), G.kW, G.W, nullptr, u.data() + oh * G.W);
          }
        } else {
          std::fill(u.begin(), u.end(), acc_t(0));
        }
        for (int64_t oh = 0; oh < (G.sW == 1 ? 0 : G.OH); ++oh) {
          acc_t* __restrict ur = u.data() + oh * G.W;
          for (int64_t ow = 0; ow < G.OW; ++ow) {
            const acc_t v = static_cast<acc_t>(gplane[oh * SG.h + ow * SG.w]) * scales[oh * G.OW + ow];
            const int64_t w0 = window_begin(ow, G.sW, G.pW), w1 = window_end(ow, G.kW, G.sW, G.pW, G.W);
            for (int64_t w = w0; w < w1; ++w) ur[w] += v;
          }
        }
        for (int64_t h = 0; h < G.H; ++h) {
          const Covering rows = covering(h, G.kH, G.sH, G.pH, 1, G.OH);
          if (SI.w == 1) {  // the covering rows' sums, in increasing oh, in registers
            int64_t count = 0;
            for (int64_t oh = rows.lo; oh <= rows.hi; ++oh) runs[count++] = u.data() + oh * G.W;
            sum_runs(runs.data(), count, G.W, static_cast<const acc_t*>(nullptr), plane + h * SI.h);
            continue;
          }
          acc_t* __restrict r = row.data();
          std::fill(r, r + G.W, acc_t(0));
          for (int64_t oh = rows.lo; oh <= rows.hi; ++oh) add_to(u.data() + oh * G.W, r, G.W, acc_t(1));
          scalar_t* dst = plane + h * SI.h;
          if (SI.w == 1) {
            store_scaled(r, dst, G.W, acc_t(1));
          } else {
            for (int64_t w = 0; w < G.W; ++w) dst[w * SI.w] = static_cast<scalar_t>(r[w]);
          }
        }
      }
    });
  });
}

}  // namespace pyops
