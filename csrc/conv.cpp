// 2-D convolution on the CPU: forward, input gradient and weight gradient.
//
// Each is a GEMM over a patch matrix (im2col) that is built per image, so it stays
// small, with ATen's at::mm/addmm doing the GEMM; a 1x1, stride-1, unpadded convolution
// is a plain GEMM on the input itself, with no patch matrix at all. The input
// gradient's GEMM yields patch gradients that col2im adds back into the image.
//
// Two layouts, each feeding the GEMM without transposes:
//  - NCHW: per image and group, y (Kg, OH*OW) = w (Kg, Cg*R*S) @ col (Cg*R*S, OH*OW).
//  - NHWC (channels_last): y (OH*OW, Kg) = col (OH*OW, R*S*Cg) @ w' (R*S*Cg, Kg),
//    with w' the weight permuted to (K, R, S, Cg) once per call.
// Images are spread over threads when there are at least as many as threads (the
// GEMMs then run single-threaded); otherwise images go one by one and the GEMMs use
// all threads. The weight gradient sums per-thread partials in a fixed order, so
// results do not vary from run to run. float16/bfloat16 are computed in float32.
//
// float32 convolutions with planes of at least 192 output pixels (and 8 output channels;
// channels_last: 64 pixels and a vector of channels) skip the patch matrix:
// csrc/conv_taps.cpp runs the forward, the input gradient (one stride-1 part per stride
// phase) and the weight gradient (on small planes only for few channels) as register-blocked
// direct kernels, which reach 1.3-1.4x BLAS's rate on these operand shapes. Small planes
// (deep layers), float64 and 1x1 stride-1 convolutions stay on the GEMM paths here.
//
// Padding is the top/left padding; the output size (taken from the output tensor)
// fixes the bottom/right one, so torch's asymmetric padding='same' needs nothing else.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "autograd.h"
#include "common.h"
#include "conv_taps.h"

namespace pyops {
namespace {

struct Geom {
  int64_t N, C, H, W, K, R, S, OH, OW, sh, sw, ph, pw, dh, dw, G;
  int64_t Cg() const { return C / G; }
  int64_t Kg() const { return K / G; }
  bool pointwise() const {  // 1x1, stride 1, no padding: the input is the patch matrix
    return R == 1 && S == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && OH == H && OW == W;
  }
};

Geom make_geom(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && y.dim() == 4, "conv2d: expected 4-D input, weight and output");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "conv2d: expected pairs");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0 && w.size(0) % groups == 0 && w.size(1) * groups == x.size(1),
              "conv2d: channels do not match groups");
  TORCH_CHECK(w.size(0) == y.size(1) && x.size(0) == y.size(0), "conv2d: output shape does not match");
  return Geom{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3), y.size(2),
              y.size(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
}

// ------------------------------------------------------------------ NCHW patches

// Stride 1 with rows as wide as the output (OW == W: 'same' padding and the like): the
// patch row of tap (r, s) over output rows [oh0, oh1) is the plane shifted by r*dh - ph
// rows and woff columns, so it moves as one contiguous run instead of one short run per
// output row (16-pixel rows of a deep layer cost more in per-row calls than in bytes).
// Only the columns whose tap falls outside [0, W), [0, lo) and [hi, W) of each row, are
// wrong in such a run; the callers zero them (im2col: in the patch; col2im: in the patch
// gradient, before adding it).
inline bool whole_plane_runs(const Geom& g) { return g.sh == 1 && g.sw == 1 && g.OW == g.W; }

// For tap row offset hoff (= r*dh - ph) over output rows [oh0, oh1): the rows [a, b) whose
// input row oh + hoff lies in [0, H), the run's start in the plane (negative when the tap
// starts left of the plane) and the run's part [first, last) that lies inside the plane
// (what lies outside is in border columns).
struct PlaneRun {
  int64_t a, b, start, first, last;
};

inline PlaneRun plane_run(const Geom& g, int64_t hoff, int64_t woff, int64_t oh0, int64_t oh1) {
  PlaneRun p;
  p.a = std::clamp(-hoff, oh0, oh1);
  p.b = std::clamp(g.H - hoff, p.a, oh1);
  p.start = (p.a + hoff) * g.W + woff;
  const int64_t len = (p.b - p.a) * g.W;
  p.first = std::min(len, std::max<int64_t>(0, -p.start));
  p.last = std::max(p.first, std::min(len, g.H * g.W - p.start));
  return p;
}

// Zero columns [0, lo) and [hi, W) of rows [0, rows) of a (rows, W) block.
template <typename T>
inline void zero_border_columns(T* __restrict block, int64_t rows, int64_t W, int64_t lo, int64_t hi) {
  if (lo == 0 && hi == W) return;
  for (int64_t i = 0; i < rows; ++i) {
    T* row = block + i * W;
    std::fill(row, row + lo, T(0));
    std::fill(row + hi, row + W, T(0));
  }
}

// Patch rows of at most this many pixels (2x2 to 4x4 planes) are built element by element,
// from a copy of the channel's plane with its zero border around it (im2col_tiny): a call
// per run of 1-16 elements, or a bounds test per element, costs more than the data.
constexpr int64_t kTinyPatchRow = 16;

// dst[0, n) = src[0, n) for a run of n <= 16 elements: one masked load and store in an
// AVX-512 build (float, and double up to 8), a loop otherwise.
template <typename T>
inline void copy_short(const T* __restrict src, T* __restrict dst, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    _mm512_mask_storeu_ps(dst, m, _mm512_maskz_loadu_ps(m, src));
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    if (n <= 8) {
      const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
      _mm512_mask_storeu_pd(dst, m, _mm512_maskz_loadu_pd(m, src));
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// The patch rows of output rows [oh0, oh1) of one channel's plane (rows ld apart), through
// `padded`, a scratch the plane's rows under them are copied into with the zero border
// every tap may reach: row i, column j of it hold input (oh0 * sh + i - ph, j - pw).
template <typename T>
void im2col_tiny(const T* __restrict plane, T* __restrict col, const Geom& g, int64_t oh0, int64_t oh1, int64_t ld,
                 std::vector<T>& padded) {
  const int64_t Hp = (oh1 - 1 - oh0) * g.sh + (g.R - 1) * g.dh + 1, Wp = (g.OW - 1) * g.sw + (g.S - 1) * g.dw + 1;
  padded.assign(Hp * Wp, T(0));
  for (int64_t i = 0; i < Hp; ++i) {
    const int64_t h = oh0 * g.sh + i - g.ph;
    if (h < 0 || h >= g.H) continue;
    const int64_t j0 = std::max<int64_t>(0, g.pw), j1 = std::min(Wp, g.W + g.pw);
    for (int64_t j = j0; j < j1; ++j) padded[i * Wp + j] = plane[h * g.W + j - g.pw];
  }
  const T* __restrict pp = padded.data();
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) {
      T* row = col + (r * g.S + s) * ld;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const T* src = pp + ((oh - oh0) * g.sh + r * g.dh) * Wp + s * g.dw;
        T* dst = row + (oh - oh0) * g.OW;
        if (g.sw == 1) {
          copy_short(src, dst, g.OW);
        } else {
          for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow] = src[ow * g.sw];
        }
      }
    }
}

#if defined(CPU_CAPABILITY_AVX512)
// Float planes of at most 64 elements (8x8 and smaller: the deep layers) fit in four zmm
// registers, and so do patch rows of at most 64 outputs. im2col then builds each tap's
// patch row, 16 outputs at a time, as one permutation of the plane's registers with zeros
// where the tap falls outside the plane; col2im adds each tap's patch row into the plane
// by the inverse permutation (a tap reads every in-plane element at most once). The
// tables (index vector, lanes that take a value, lanes reading registers 2-3) per tap
// and 16-lane chunk depend on the geometry only. This replaces a copy or add per output
// row (rows of 2-8 elements made im2col a quarter of the GEMM's time); each element still
// gets its taps' terms in tap order, as the row loops add them.
constexpr int64_t kRegisterPlane = 64;

inline bool register_plane(const Geom& g, int64_t cols) { return g.H * g.W <= kRegisterPlane && cols <= kRegisterPlane; }

struct RegisterPermutes {
  int64_t regs = 0, chunks = 0;           // registers of the source, 16-lane chunks of the destination
  std::vector<int32_t> idx;               // (tap, chunk, lane): the source element, 0..63
  std::vector<__mmask16> inside, upper;   // (tap, chunk): lanes that take a source element; those >= 32
};

// Source and destination: the plane and the patch row of output rows [oh0, oh1) of each
// tap (im2col), or the reverse (to_plane: col2im).
RegisterPermutes register_permutes(const Geom& g, int64_t oh0, int64_t oh1, bool to_plane) {
  RegisterPermutes t;
  const int64_t plane = g.H * g.W, cols = (oh1 - oh0) * g.OW;
  const int64_t src = to_plane ? cols : plane, dst = to_plane ? plane : cols;
  t.regs = src <= 16 ? 1 : src <= 32 ? 2 : 4;
  t.chunks = (dst + 15) / 16;
  const int64_t entries = g.R * g.S * t.chunks;
  t.idx.assign(entries * 16, 0);
  t.inside.assign(entries, 0);
  t.upper.assign(entries, 0);
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s)
      for (int64_t q = 0; q < cols; ++q) {
        const int64_t h = (oh0 + q / g.OW) * g.sh - g.ph + r * g.dh, w = (q % g.OW) * g.sw - g.pw + s * g.dw;
        if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
        const int64_t at = h * g.W + w, from = to_plane ? q : at, into = to_plane ? at : q;
        const int64_t e = (r * g.S + s) * t.chunks + into / 16;
        const auto bit = static_cast<__mmask16>(1u << (into % 16));
        t.idx[e * 16 + into % 16] = static_cast<int32_t>(from);
        t.inside[e] |= bit;
        if (from >= 32) t.upper[e] |= bit;
      }
  return t;
}

// register_permutes of the last geometry this thread asked for, per direction: callers
// go channel by channel or image by image, each call with the same tables.
const RegisterPermutes& cached_permutes(const Geom& g, int64_t oh0, int64_t oh1, bool to_plane) {
  using Key = std::array<int64_t, 14>;
  thread_local RegisterPermutes tables[2];
  thread_local Key keys[2] = {Key{-1}, Key{-1}};
  const Key key{g.H, g.W, g.R, g.S, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, oh0, oh1};
  if (keys[to_plane] != key) {
    tables[to_plane] = register_permutes(g, oh0, oh1, to_plane);
    keys[to_plane] = key;
  }
  return tables[to_plane];
}

inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1u);
}

// The n <= 64 floats at p in four registers (zeros past n).
struct Regs {
  __m512 z[4];
  Regs(const float* p, int64_t n) {
    for (int64_t i = 0; i < 4; ++i) z[i] = _mm512_maskz_loadu_ps(first_lanes(n - 16 * i), p + 16 * i);
  }
  // entry e of t: its source elements in its lanes (others: zero for im2col's zero padding)
  __m512 permute(const RegisterPermutes& t, int64_t e) const {
    const __m512i id = _mm512_loadu_si512(t.idx.data() + e * 16);
    if (t.regs == 1) return _mm512_maskz_permutexvar_ps(t.inside[e], id, z[0]);
    if (t.regs == 2) return _mm512_maskz_permutex2var_ps(t.inside[e], z[0], id, z[1]);
    const __m512 lo = _mm512_permutex2var_ps(z[0], id, z[1]), hi = _mm512_permutex2var_ps(z[2], id, z[3]);
    return _mm512_maskz_mov_ps(t.inside[e], _mm512_mask_blend_ps(t.upper[e], lo, hi));
  }
};

// im2col_nchw for register_plane geometries, channels [c0, c1).
void im2col_register_plane(const float* __restrict x, float* __restrict col, const Geom& g, int64_t oh0, int64_t oh1,
                           int64_t ld, int64_t c0, int64_t c1) {
  const RegisterPermutes& t = cached_permutes(g, oh0, oh1, false);
  const int64_t plane = g.H * g.W, taps = g.R * g.S, cols = (oh1 - oh0) * g.OW;
  for (int64_t c = c0; c < c1; ++c) {
    const Regs src(x + c * plane, plane);
    float* rows = col + c * taps * ld;
    for (int64_t tap = 0; tap < taps; ++tap)
      for (int64_t j = 0; j < t.chunks; ++j)
        _mm512_mask_storeu_ps(rows + tap * ld + j * 16, first_lanes(cols - j * 16), src.permute(t, tap * t.chunks + j));
  }
}

// col2im_nchw for register_plane geometries: planes [c0, c1) of dx += their patch
// gradients, rows ld apart.
void col2im_register_plane(const float* __restrict dcol, float* __restrict dx, const Geom& g, int64_t oh0, int64_t oh1,
                           int64_t ld, int64_t c0, int64_t c1) {
  const RegisterPermutes& t = cached_permutes(g, oh0, oh1, true);
  const int64_t plane = g.H * g.W, taps = g.R * g.S, cols = (oh1 - oh0) * g.OW;
  for (int64_t c = c0; c < c1; ++c) {
    float* p = dx + c * plane;
    __m512 acc[4];
    for (int64_t j = 0; j < t.chunks; ++j) acc[j] = _mm512_maskz_loadu_ps(first_lanes(plane - j * 16), p + j * 16);
    const float* rows = dcol + c * taps * ld;
    for (int64_t tap = 0; tap < taps; ++tap) {
      const Regs src(rows + tap * ld, cols);
      for (int64_t j = 0; j < t.chunks; ++j) {
        const int64_t e = tap * t.chunks + j;
        acc[j] = _mm512_mask_add_ps(acc[j], t.inside[e], acc[j], src.permute(t, e));
      }
    }
    for (int64_t j = 0; j < t.chunks; ++j) _mm512_mask_storeu_ps(p + j * 16, first_lanes(plane - j * 16), acc[j]);
  }
}
#endif

// col (Cg*R*S, (oh1-oh0)*OW), rows ld apart (default: packed): the patches of output rows
// [oh0, oh1) of channels [c0, c1) (default: all) of one image's group (x points at its
// first channel plane).
template <typename T>
void im2col_nchw(const T* __restrict x, T* __restrict col, const Geom& g, int64_t oh0, int64_t oh1,
                 int64_t ld = -1, int64_t c0 = 0, int64_t c1 = -1) {
  const int64_t cols = (oh1 - oh0) * g.OW;
  if (ld < 0) ld = cols;
  if (c1 < 0) c1 = g.Cg();
  const bool runs = whole_plane_runs(g);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (register_plane(g, cols)) {
      im2col_register_plane(x, col, g, oh0, oh1, ld, c0, c1);
      return;
    }
  }
#endif
  if (cols <= kTinyPatchRow) {
    std::vector<T> padded;
    for (int64_t c = c0; c < c1; ++c)
      im2col_tiny(x + c * g.H * g.W, col + c * g.R * g.S * ld, g, oh0, oh1, ld, padded);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    const T* plane = x + c * g.H * g.W;
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        T* row = col + ((c * g.R + r) * g.S + s) * ld;
        int64_t lo, hi;
        const int64_t woff = s * g.dw - g.pw;
        valid_range(woff, g.sw, g.W, g.OW, lo, hi);
        if (runs) {
          const PlaneRun p = plane_run(g, r * g.dh - g.ph, woff, oh0, oh1);
          T* dst = row + (p.a - oh0) * g.W;
          std::fill(row, dst, T(0));
          std::fill(row + (p.b - oh0) * g.W, row + cols, T(0));
          if (p.last > p.first) std::memcpy(dst + p.first, plane + p.start + p.first, (p.last - p.first) * sizeof(T));
          zero_border_columns(dst, p.b - p.a, g.W, lo, hi);  // also the run's ends outside the plane
          continue;
        }
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          T* dst = row + (oh - oh0) * g.OW;
          const int64_t h = oh * g.sh - g.ph + r * g.dh;
          if (h < 0 || h >= g.H) {
            std::fill(dst, dst + g.OW, T(0));
            continue;
          }
          const T* src = plane + h * g.W + woff;
          std::fill(dst, dst + lo, T(0));
          if (g.sw == 1) {
            if (hi > lo) std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(T));
          } else if (g.sw == 2) {  // a constant stride the compiler vectorises (two loads + a permute)
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * 2];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * g.sw];
          }
          std::fill(dst + hi, dst + g.OW, T(0));
        }
      }
    }
  }
}

template <typename T>
inline void add_run(const T* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// dx planes (Cg, H, W) of one image's group += the patch gradients dcol
// (Cg*R*S, (oh1-oh0)*OW) of output rows [oh0, oh1). dcol is the caller's scratch: the
// whole-plane-run path zeroes its out-of-row columns.
template <typename T>
void col2im_nchw(T* __restrict dcol, T* __restrict dx, const Geom& g, int64_t oh0, int64_t oh1) {
  const int64_t cols = (oh1 - oh0) * g.OW;
  const bool runs = whole_plane_runs(g);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (register_plane(g, cols)) {
      col2im_register_plane(dcol, dx, g, oh0, oh1, cols, 0, g.Cg());
      return;
    }
  }
#endif
  for (int64_t c = 0; c < g.Cg(); ++c) {
    T* plane = dx + c * g.H * g.W;
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        T* row = dcol + ((c * g.R + r) * g.S + s) * cols;
        int64_t lo, hi;
        const int64_t woff = s * g.dw - g.pw;
        valid_range(woff, g.sw, g.W, g.OW, lo, hi);
        if (runs) {
          const PlaneRun p = plane_run(g, r * g.dh - g.ph, woff, oh0, oh1);
          T* src = row + (p.a - oh0) * g.W;
          zero_border_columns(src, p.b - p.a, g.W, lo, hi);
          add_run(src + p.first, plane + p.start + p.first, p.last - p.first);
          continue;
        }
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const int64_t h = oh * g.sh - g.ph + r * g.dh;
          if (h < 0 || h >= g.H) continue;
          const T* src = row + (oh - oh0) * g.OW;
          T* dst = plane + h * g.W + woff;
          if (g.sw == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += src[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow * g.sw] += src[ow];
          }
        }
      }
    }
  }
}

// Column stride 2: col2im's adds land on every other column, a strided read-modify-write
// the compiler cannot vectorise. Instead they go to a phase-split copy of the planes,
// P (Cg, H, 2, half) with column w = 2 * j + phase at P[c, h, phase, j], where every tap
// adds a contiguous run; interleave_phases then writes the planes once.
inline int64_t phase_half(const Geom& g) { return (g.W + 1) / 2 + 1; }

template <typename T>
void col2im_nchw_phases(const T* __restrict dcol, T* __restrict P, const Geom& g, int64_t oh0, int64_t oh1) {
  const int64_t cols = (oh1 - oh0) * g.OW, half = phase_half(g);
  for (int64_t c = 0; c < g.Cg(); ++c) {
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        const T* row = dcol + ((c * g.R + r) * g.S + s) * cols;
        int64_t lo, hi;
        const int64_t woff = s * g.dw - g.pw;
        valid_range(woff, 2, g.W, g.OW, lo, hi);
        const int64_t phase = woff & 1, shift = (woff - phase) / 2;  // w = 2 * (ow + shift) + phase
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const int64_t h = oh * g.sh - g.ph + r * g.dh;
          if (h < 0 || h >= g.H) continue;
          const T* src = row + (oh - oh0) * g.OW;
          T* dst = P + ((c * g.H + h) * 2 + phase) * half + shift;
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += src[ow];
        }
      }
    }
  }
}

template <typename T>
void interleave_phases(const T* __restrict P, T* __restrict dx, const Geom& g) {
  const int64_t half = phase_half(g);
  for (int64_t q = 0; q < g.Cg() * g.H; ++q) {
    const T* even = P + q * 2 * half;
    const T* odd = even + half;
    T* row = dx + q * g.W;
    for (int64_t j = 0; 2 * j < g.W; ++j) row[2 * j] = even[j];
    for (int64_t j = 0; 2 * j + 1 < g.W; ++j) row[2 * j + 1] = odd[j];
  }
}

// Output rows per patch tile of the NCHW per-image paths: the patch matrix is built and
// consumed one tile at a time, sized to stay in a core's L2 cache (about 512 KiB) while
// keeping the GEMM's pixel dimension long enough (>= 256) to run near its rate.
constexpr int64_t kTileBytes = 512 * 1024, kMinTilePixels = 256;

int64_t tile_rows(const Geom& g, int64_t elem_size) {
  const int64_t patch_rows = g.Cg() * g.R * g.S;
  const int64_t pixels = std::max(kMinTilePixels, kTileBytes / std::max<int64_t>(patch_rows * elem_size, 1));
  return std::clamp<int64_t>(pixels / std::max<int64_t>(g.OW, 1), 1, g.OH);
}

// ------------------------------------------------------------------ NHWC patches

// The filter taps s of output column ow that fall inside the input row: [s_lo, s_hi).
inline void inside_taps(const Geom& g, int64_t ow, int64_t& s_lo, int64_t& s_hi) {
  const int64_t w0 = ow * g.sw - g.pw;  // input column of tap 0
  s_lo = w0 >= 0 ? 0 : std::min<int64_t>(g.S, (-w0 + g.dw - 1) / g.dw);
  s_hi = w0 >= g.W ? 0 : std::min<int64_t>(g.S, (g.W - 1 - w0) / g.dw + 1);
  s_hi = std::max(s_hi, s_lo);
}

// col ((oh1 - oh0)*OW, R*S*Cg): output rows [oh0, oh1) of one image's group (whole image:
// 0, OH); x points at the image, channel offset c0.
// Taps outside the input are zeros. With one group and unit column dilation a patch row's
// taps r, s_lo..s_hi-1 are one contiguous run of the input row (the ResNet stem's 7 taps of
// 3 channels: one 21-element copy, not seven 3-element ones).
template <typename T>
void im2col_nhwc(const T* __restrict x, T* __restrict col, const Geom& g, int64_t c0, int64_t oh0, int64_t oh1) {
  const int64_t Cg = g.Cg(), SC = g.S * Cg, RSC = g.R * SC;
  const bool runs = g.G == 1 && g.dw == 1;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      int64_t s_lo, s_hi;
      inside_taps(g, ow, s_lo, s_hi);
      const int64_t w0 = ow * g.sw - g.pw;
      T* dst = col + ((oh - oh0) * g.OW + ow) * RSC;
      for (int64_t r = 0; r < g.R; ++r, dst += SC) {
        const int64_t h = oh * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H || s_lo == s_hi) {
          std::fill(dst, dst + SC, T(0));
          continue;
        }
        std::fill(dst, dst + s_lo * Cg, T(0));
        std::fill(dst + s_hi * Cg, dst + SC, T(0));
        const T* row = x + h * g.W * g.C + c0;
        if (runs) {
          const T* src = row + (w0 + s_lo) * g.C;
          const int64_t n = (s_hi - s_lo) * Cg;
          for (int64_t i = 0; i < n; ++i) dst[s_lo * Cg + i] = src[i];
        } else {
          for (int64_t s = s_lo; s < s_hi; ++s)
            std::memcpy(dst + s * Cg, row + (w0 + s * g.dw) * g.C, Cg * sizeof(T));
        }
      }
    }
  }
}

template <typename T>
void col2im_nhwc(const T* __restrict dcol, T* __restrict dx, const Geom& g, int64_t c0, int64_t oh0, int64_t oh1) {
  const int64_t Cg = g.Cg(), SC = g.S * Cg, RSC = g.R * SC;
  const bool runs = g.G == 1 && g.dw == 1;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      int64_t s_lo, s_hi;
      inside_taps(g, ow, s_lo, s_hi);
      const int64_t w0 = ow * g.sw - g.pw;
      const T* src = dcol + ((oh - oh0) * g.OW + ow) * RSC;
      for (int64_t r = 0; r < g.R; ++r, src += SC) {
        const int64_t h = oh * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H) continue;
        T* row = dx + h * g.W * g.C + c0;
        if (runs) {  // the run's elements in the order the per-tap loops added them
          T* dst = row + (w0 + s_lo) * g.C;
          const T* from = src + s_lo * Cg;
          const int64_t n = (s_hi - s_lo) * Cg;
          for (int64_t i = 0; i < n; ++i) dst[i] += from[i];
        } else {
          for (int64_t s = s_lo; s < s_hi; ++s) {
            T* dst = row + (w0 + s * g.dw) * g.C;
            for (int64_t c = 0; c < Cg; ++c) dst[c] += src[s * Cg + c];
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ driver

// Runs body(n, scratch) for every image n: over threads when there are enough images
// (then each GEMM is single-threaded), else one by one with multi-threaded GEMMs.
// ``slot`` is the per-thread index body may use for thread-private buffers.
template <typename Body>
void for_each_image(int64_t N, Body body) {
  const int64_t threads = at::get_num_threads();
  if (N >= threads && threads > 1) {
    const at::ThreadLocalState state;  // inference mode etc. hold in the worker threads too
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t t = t0; t < t1; ++t) {
        // a fixed image -> slot assignment: deterministic sums whatever the scheduling
        for (int64_t n = t; n < N; n += threads) body(n, t);
      }
    });
  } else {
    for (int64_t n = 0; n < N; ++n) body(n, 0);
  }
}

int64_t slots_for(int64_t N) {
  const int64_t threads = at::get_num_threads();
  return (N >= threads && threads > 1) ? threads : 1;
}

at::Tensor dense_as(const at::Tensor& t, bool channels_last) {
  return t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Small output planes (deep layers: 7x7, 4x4, 2x2 pixels) make per-image GEMMs with a
// tiny N dimension, which BLAS runs several times below its rate (256x2304 by 2304x4:
// ~7 GFLOP/s). Below kBatchedPixels output pixels the NCHW paths put all images side by
// side in one GEMM instead: columns (Cg*R*S, N*OH*OW).
constexpr int64_t kBatchedPixels = 64;

bool batched_nchw(const Geom& g, bool cl) {
  return !cl && g.N > 1 && g.OH * g.OW < kBatchedPixels;
}

// channels_last with one group: images are consecutive row blocks of the NHWC patch matrix
// and of the output, so small planes take one GEMM over all images, (N*OH*OW, C*R*S) by
// (C*R*S, K), written straight into y (per image, a 4x4 plane's 16 rows ran MKL at a
// quarter of torch's rate: the 3x3 512->512 layer on 8x512x4x4, 12.8 against 3.2 ms).
bool batched_nhwc(const Geom& g, bool cl) {
  return cl && g.G == 1 && g.N > 1 && g.OH * g.OW < kBatchedPixels && !g.pointwise();
}

// Patches of one NHWC image (one group) in the weight's own (C, R, S) order: col (OH*OW,
// C*R*S), so the GEMMs take w (K, C*R*S) and give dw as they are. The NHWC per-image paths
// build (R, S, C) rows instead (a tap's channels one run) and permute the weight once per
// call: on the small planes that take these batched GEMMs the weight outweighs the
// patches (3x3 512->512 on 8x512x4x4: 2.4M weights, 0.6M patch elements), and its
// permuted copy was a sixth of the forward.
template <typename T>
void im2col_nhwc_crs(const T* __restrict x, T* __restrict col, const Geom& g) {
  const int64_t RS = g.R * g.S, CRS = g.C * RS;
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      T* dst = col + (oh * g.OW + ow) * CRS;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t h = oh * g.sh - g.ph + r * g.dh;
        for (int64_t s = 0; s < g.S; ++s) {
          const int64_t w = ow * g.sw - g.pw + s * g.dw, t = r * g.S + s;
          if (h < 0 || h >= g.H || w < 0 || w >= g.W) {
            for (int64_t c = 0; c < g.C; ++c) dst[c * RS + t] = T(0);
          } else {
            const T* src = x + (h * g.W + w) * g.C;
            for (int64_t c = 0; c < g.C; ++c) dst[c * RS + t] = src[c];
          }
        }
      }
    }
  }
}

// dx (one NHWC image) += the patch gradients dcol (OH*OW, C*R*S), pixel by pixel and tap by
// tap in order (as col2im_nhwc adds them).
template <typename T>
void col2im_nhwc_crs(const T* __restrict dcol, T* __restrict dx, const Geom& g) {
  const int64_t RS = g.R * g.S, CRS = g.C * RS;
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const T* src = dcol + (oh * g.OW + ow) * CRS;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t h = oh * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const int64_t w = ow * g.sw - g.pw + s * g.dw, t = r * g.S + s;
          if (w < 0 || w >= g.W) continue;
          T* dst = dx + (h * g.W + w) * g.C;
          for (int64_t c = 0; c < g.C; ++c) dst[c] += src[c * RS + t];
        }
      }
    }
  }
}

// (N*OH*OW, C*R*S) NHWC patches of every image (batched_nhwc geometries).
template <typename T>
at::Tensor im2col_nhwc_all(const at::Tensor& x, const Geom& g) {
  const int64_t OHW = g.OH * g.OW, CRS = g.R * g.S * g.C;
  at::Tensor col = at::empty({g.N * OHW, CRS}, x.options());
  const T* xp = x.data_ptr<T>();
  T* cp = col.data_ptr<T>();
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) im2col_nhwc_crs<T>(xp + n * g.H * g.W * g.C, cp + n * OHW * CRS, g);
  });
  return col;
}

// An NHWC-dense (N, C, H, W) tensor as its (N*H*W, C) rows (a view).
at::Tensor nhwc_rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// The direct register-blocked kernel (conv_taps.cpp) for float32 where it suits.
// A part: one convolution for it, the taps of w it reads and where its output starts in
// an image's group.
struct TapPart {
  TapConv tc;
  std::vector<int64_t> taps;
  int64_t y_offset;
};

TapPart forward_taps(const Geom& g, bool cl) {
  std::vector<int64_t> taps(g.R * g.S);
  for (int64_t t = 0; t < g.R * g.S; ++t) taps[t] = t;
  TapConv tc{g.N, g.Cg(), g.Kg(), g.H, g.W, g.OH, g.OW, g.R, g.S, g.sh, g.sw, g.dh, g.dw, g.ph, g.pw,
             g.C * g.H * g.W, g.K * g.OH * g.OW, g.OH * g.OW, g.OW, 1};
  if (cl) {
    tc.x_pixel = g.C;
    tc.y_plane = 1;
    tc.y_row = g.OW * g.K;
    tc.y_col = g.K;
  }
  return {tc, std::move(taps), 0};
}

// Along one axis, the input gradient's outputs i = a + stride * j (phase a) take dy at
// j + shift for the filter taps r with a + pad - r * dil divisible by stride. Those taps,
// from the largest (first) down in steps of stride / gcd(stride, dil), read dy at shifts
// growing by dil / gcd: a stride-1 convolution of dy with that dilation, padded by -shift
// of the first. count == 0: no tap reaches this phase.
struct AxisPhase {
  int64_t first, count, step, dil, pad, outputs;
};

AxisPhase axis_phase(int64_t a, int64_t taps, int64_t stride, int64_t dil, int64_t pad, int64_t size) {
  const int64_t gg = std::gcd(stride, dil);
  AxisPhase p{-1, 0, stride / gg, dil / gg, 0, size > a ? (size - a + stride - 1) / stride : 0};
  for (int64_t r = taps - 1; r >= 0 && p.first < 0; --r) {
    if (((a + pad - r * dil) % stride + stride) % stride == 0) p.first = r;
  }
  if (p.first >= 0) {
    p.count = p.first / p.step + 1;
    p.pad = -((a + pad - p.first * dil) / stride);  // exact division
  }
  return p;
}

// The input gradient, one part per stride phase (a, b) of dx: dy convolved with the
// transposed filter's taps that reach the phase, in reverse order (stride 1: one part,
// dy padded by (R-1)*dh - ph). Phases no tap reaches get no part (their dx is zero:
// *uncovered is set); phases without outputs (a dx smaller than the stride) neither.
std::vector<TapPart> input_grad_parts(const Geom& g, bool cl, bool* uncovered) {
  std::vector<TapPart> parts;
  *uncovered = false;
  for (int64_t a = 0; a < g.sh; ++a) {
    const AxisPhase rows = axis_phase(a, g.R, g.sh, g.dh, g.ph, g.H);
    for (int64_t b = 0; b < g.sw; ++b) {
      const AxisPhase cols = axis_phase(b, g.S, g.sw, g.dw, g.pw, g.W);
      if (rows.outputs == 0 || cols.outputs == 0) continue;
      if (rows.count == 0 || cols.count == 0) {
        *uncovered = true;
        continue;
      }
      std::vector<int64_t> taps;
      for (int64_t m = 0; m < rows.count; ++m)
        for (int64_t n = 0; n < cols.count; ++n) taps.push_back((rows.first - m * rows.step) * g.S + cols.first - n * cols.step);
      TapConv tc{g.N, g.Kg(), g.Cg(), g.OH, g.OW, rows.outputs, cols.outputs, rows.count, cols.count, 1, 1,
                 rows.dil, cols.dil, rows.pad, cols.pad, g.K * g.OH * g.OW, g.C * g.H * g.W, g.H * g.W,
                 g.sh * g.W, g.sw};
      int64_t y_offset = a * g.W + b;
      if (cl) {
        tc.x_pixel = g.K;
        tc.y_plane = 1;
        tc.y_row = g.sh * g.W * g.C;
        tc.y_col = g.sw * g.C;
        y_offset *= g.C;
      }
      parts.push_back({tc, std::move(taps), y_offset});
    }
  }
  return parts;
}

bool use_taps(const Geom& g, const at::Tensor& t, const std::vector<TapPart>& parts, bool weight_grad = false) {
  if (t.scalar_type() != at::kFloat || g.pointwise() || parts.empty()) return false;
  return std::all_of(parts.begin(), parts.end(), [&](const TapPart& p) {
    return weight_grad ? tap_conv_weight_grad_suits(p.tc) : tap_conv_suits(p.tc);
  });
}

// Every group of x (N, G*Cin, ...) into y (N, G*Kout, ...) with w's group slices (forward:
// (G*Kout, Cin, R, S); transposed: (G*Cin, Kout, R, S)).
void run_taps(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const std::vector<TapPart>& parts,
              const Geom& g, bool transposed) {
  const int64_t w_group = g.Kg() * g.Cg() * g.R * g.S;
  for (int64_t grp = 0; grp < g.G; ++grp) {
    for (const TapPart& part : parts) {
      const TapConv& tc = part.tc;
      const at::Tensor packed = tap_conv_pack(w.data_ptr<float>() + grp * w_group, tc, part.taps, g.R * g.S, transposed);
      tap_conv_run(x.data_ptr<float>() + grp * tc.Cin * (tc.x_pixel ? 1 : tc.H * tc.W), packed,
                   y.data_ptr<float>() + grp * tc.Kout * tc.y_plane + part.y_offset, tc);
    }
  }
}

// (GEMMs here are mm_out: the functional at::mm would follow an enclosing torch.autocast
// and return bfloat16, while these kernels compute in the dtype they were given.)
// im2col of group grp of every image of NCHW-contiguous x: (Cg*R*S, N*OH*OW).
template <typename T>
at::Tensor im2col_all(const at::Tensor& x, const Geom& g, int64_t grp) {
  const int64_t Cg = g.Cg(), RS = g.R * g.S, OHW = g.OH * g.OW;
  const T* px = x.data_ptr<T>();
  at::Tensor cols = at::empty({Cg * RS, g.N * OHW}, x.options());
  T* pc = cols.data_ptr<T>();
  // Image n fills columns [n*OHW, (n+1)*OHW) of every row, so no permuted copy follows.
  // Threads take channels (whole rows): split by image, two threads would write the
  // same cache lines of every short row.
  at::parallel_for(0, Cg, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < g.N; ++n)
      im2col_nchw<T>(px + (n * g.C + grp * Cg) * g.H * g.W, pc + n * OHW, g, 0, g.OH, g.N * OHW, c0, c1);
  });
  return cols;
}

// Group grp's channels of dy (N, K, OH, OW) as (Kg, N*OH*OW).
at::Tensor grad_all(const at::Tensor& dy, const Geom& g, int64_t grp) {
  return dy.narrow(1, grp * g.Kg(), g.Kg()).permute({1, 0, 2, 3}).reshape({g.Kg(), g.N * g.OH * g.OW});
}

void add_bias(const at::Tensor& out, const at::Tensor& bias, bool channels_last) {
  // out (N, K, H, W) dense in its layout += bias[k]
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "conv2d_bias", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    const int64_t N = out.size(0), K = out.size(1), HW = out.size(2) * out.size(3);
    if (channels_last) {
      at::parallel_for(0, N * HW, 256, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          scalar_t* row = o + p * K;
          for (int64_t k = 0; k < K; ++k) row[k] += b[k];
        }
      });
    } else {
      at::parallel_for(0, N * K, 16, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          scalar_t* plane = o + q * HW;
          const scalar_t v = b[q % K];
          for (int64_t p = 0; p < HW; ++p) plane[p] += v;
        }
      });
    }
  });
}

// ------------------------------------------------------------------ one channel per group

// Convolutions whose groups hold one input channel each (depthwise, with any channel
// multiplier, and any convolution of a single-channel input) do 2*R*S flops per output
// element: as GEMMs they are hundreds of tiny ones. These kernels run them directly,
// each output plane (NCHW) or pixel (NHWC) from its own R x S filter, vectorised along
// output rows (NCHW) or channels (NHWC), every output element written by one task in a
// fixed order (deterministic).
// Tasks of at least ~32K multiply-adds each in the direct kernels below, so small
// convolutions do not pay for threads: the parallel_for grain for a given work per task.
inline int64_t direct_grain(int64_t work_per_task) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_task, 1));
}

bool one_channel_groups(const Geom& g, bool cl) {
  return g.Cg() == 1 && (!cl || g.Kg() == 1);  // NHWC: plain depthwise (multiplier 1) only
}

// Unit column stride: each plane is first copied into a zero-padded scratch plane, so
// every tap reads a full row block with no bounds checks, and a block of up to kRowBytes
// of outputs accumulates in vector registers over all R*S taps (independent chains). A
// block is as many vectors as a row needs (a 14-wide row takes one 16-lane vector, not
// 64 lanes), so narrow planes do not compute mostly padding.
constexpr int64_t kRowBytes = 256;

template <typename T>
using RowVec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t max_row_vectors() {
  return std::max<int64_t>(1, kRowBytes / static_cast<int64_t>(sizeof(T) * RowVec<T>::size()));
}

// Vectors per row block for rows of `cols` outputs: a power of two up to max_row_vectors.
template <typename T>
int64_t row_vectors(int64_t cols) {
  const int64_t need = (cols + RowVec<T>::size() - 1) / RowVec<T>::size();
  int64_t nv = 1;
  while (nv < need && nv < max_row_vectors<T>()) nv *= 2;
  return nv;
}

// Scratch sizes of a padded plane read by conv_padded_plane for an (OH, OW) output: rows,
// and the width of each of its sw column phases.
inline int64_t padded_rows(int64_t OH, int64_t R, int64_t sh, int64_t dh) { return (OH - 1) * sh + (R - 1) * dh + 1; }
template <typename T>
int64_t padded_width(int64_t OW, int64_t S, int64_t dw, int64_t sw) {
  const int64_t block = row_vectors<T>(OW) * RowVec<T>::size();
  return (OW + block - 1) / block * block + (S - 1) * dw / sw;
}

// Offsets of the R*S taps in a padded plane of `phases` column phases of (rows, width):
// tap (r, s) of output (oh, ow) reads padded column ow * sw + s * dw, which is column
// ow + (s * dw) / sw of phase (s * dw) % sw, so every tap reads unit-stride rows.
std::vector<int64_t> tap_offsets(int64_t R, int64_t S, int64_t dh, int64_t dw, int64_t sw, int64_t rows,
                                 int64_t width) {
  std::vector<int64_t> off(R * S);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < S; ++s) off[r * S + s] = (s * dw % sw) * rows * width + r * dh * width + s * dw / sw;
  return off;
}

// A scratch plane of `phases` column phases, each (rows, width), holding (src_rows, src_cols)
// planes shifted by (top, left), zeros elsewhere: padded column j is column j / phases of
// phase j % phases. The zeros are written once: every plane loaded overwrites the same
// elements, so each load copies just the source.
template <typename T>
class PaddedPlane {
 public:
  PaddedPlane(int64_t src_rows, int64_t src_cols, int64_t top, int64_t left, int64_t rows, int64_t width,
              int64_t phases = 1)
      : buf_(phases * rows * width, T(0)), phases_(phases), plane_(rows * width), width_(width),
        src_cols_(src_cols), top_(top), left_(left) {
    j0_ = std::clamp<int64_t>(left, 0, width * phases);
    j1_ = std::clamp<int64_t>(left + src_cols, j0_, width * phases);
    i0_ = std::clamp<int64_t>(top, 0, rows);
    i1_ = std::clamp<int64_t>(top + src_rows, i0_, rows);
  }
  const T* load(const T* __restrict src) {
    for (int64_t i = i0_; i < i1_; ++i) {
      const T* srow = src + (i - top_) * src_cols_ - left_;  // srow[j]: padded column j
      T* drow = buf_.data() + i * width_;
      if (phases_ == 1) {
        std::memcpy(drow + j0_, srow + j0_, (j1_ - j0_) * sizeof(T));
      } else if (phases_ == 2) {
        deinterleave_row(srow, drow, drow + plane_);
      } else {
        for (int64_t j = j0_; j < j1_; ++j) drow[(j % phases_) * plane_ + j / phases_] = srow[j];
      }
    }
    return buf_.data();
  }

 private:
  // Two phases: padded columns [j0, j1) of srow to even (d0) and odd (d1) columns.
  void deinterleave_row(const T* __restrict srow, T* __restrict d0, T* __restrict d1) const {
    using Vec = RowVec<T>;
    constexpr int64_t VS = Vec::size();
    int64_t j = j0_;
    if (j & 1) {
      d1[j / 2] = srow[j];
      ++j;
    }
    for (; j + 2 * VS <= j1_; j += 2 * VS) {
      const auto [even, odd] = at::vec::deinterleave2(Vec::loadu(srow + j), Vec::loadu(srow + j + VS));
      even.store(d0 + j / 2);
      odd.store(d1 + j / 2);
    }
    for (; j < j1_; ++j) {
      if (j & 1) {
        d1[j / 2] = srow[j];
      } else {
        d0[j / 2] = srow[j];
      }
    }
  }

  std::vector<T> buf_;
  int64_t phases_, plane_, width_, src_cols_, top_, left_, i0_, i1_, j0_, j1_;
};

// out (OH, OW) (+)= sum over taps t of f[t] * P[oh * sh * width + off[t] + ow] (tap_offsets), in
// row blocks of NV vectors.
template <typename T, int64_t NV>
void conv_padded_rows(const T* __restrict P, int64_t width, const int64_t* __restrict off, const T* __restrict f,
                      T* __restrict out, int64_t OH, int64_t OW, int64_t RS, int64_t sh, bool accumulate) {
  using Vec = RowVec<T>;
  constexpr int64_t VS = Vec::size(), L = NV * VS;
  for (int64_t oh = 0; oh < OH; ++oh) {
    const T* base = P + oh * sh * width;
    T* orow = out + oh * OW;
    for (int64_t ow0 = 0; ow0 < OW; ow0 += L) {
      Vec acc[NV];
      for (int64_t v = 0; v < NV; ++v) acc[v] = Vec(T(0));
      for (int64_t t = 0; t < RS; ++t) {
        const Vec fv(f[t]);
        const T* src = base + off[t] + ow0;
        for (int64_t v = 0; v < NV; ++v) acc[v] = at::vec::fmadd(fv, Vec::loadu(src + v * VS), acc[v]);
      }
      for (int64_t v = 0; v < NV; ++v) {
        const int64_t cnt = std::min<int64_t>(VS, OW - ow0 - v * VS);
        if (cnt <= 0) break;
        T* o = orow + ow0 + v * VS;
        if (cnt == VS) {
          (accumulate ? acc[v] + Vec::loadu(o) : acc[v]).store(o);
        } else {
          (accumulate ? acc[v] + Vec::loadu(o, cnt) : acc[v]).store(o, cnt);
        }
      }
    }
  }
}

template <typename T>
void conv_padded_plane(const T* P, int64_t width, const int64_t* off, const T* f, T* out, int64_t OH, int64_t OW,
                       int64_t RS, int64_t sh, bool accumulate) {
  switch (row_vectors<T>(OW)) {
    case 1: return conv_padded_rows<T, 1>(P, width, off, f, out, OH, OW, RS, sh, accumulate);
    case 2: return conv_padded_rows<T, 2>(P, width, off, f, out, OH, OW, RS, sh, accumulate);
    case 4: return conv_padded_rows<T, 4>(P, width, off, f, out, OH, OW, RS, sh, accumulate);
    default:
      if constexpr (max_row_vectors<T>() >= 8) {
        return conv_padded_rows<T, 8>(P, width, off, f, out, OH, OW, RS, sh, accumulate);
      }
      TORCH_INTERNAL_ASSERT(false, "conv_padded_plane: unexpected row block");
  }
}

// acc[t] += sum over (oh, ow) of dyp[oh, ow] * P[oh * sh * width + off[t] + ow] (tap_offsets):
// dyp is dy's plane as is (rows of OW, the last vector of a row a masked load, zeros past
// OW, which makes the padded P's values there irrelevant). With RS_ taps known at
// compile time, every tap's partial sums stay in registers and each dy vector is loaded
// once for all taps; RS_ = 0 takes one tap at a time (any filter size).
template <typename T, int64_t RS_>
void weight_grad_plane(const T* __restrict dyp, int64_t OW, const T* __restrict P, int64_t width,
                       const int64_t* __restrict offsets, T* __restrict acc, int64_t OH, int64_t RS, int64_t sh) {
  using Vec = RowVec<T>;
  constexpr int64_t VS = Vec::size();
  const int64_t full = OW / VS * VS, tail = OW - full;
  const auto reduce = [](const Vec& v) {
    alignas(64) T lanes[VS];
    v.store(lanes);
    T sum = 0;
    for (int64_t j = 0; j < VS; ++j) sum += lanes[j];
    return sum;
  };
  if constexpr (RS_ > 0) {
    TORCH_INTERNAL_ASSERT(RS == RS_);
    int64_t off[RS_];
    std::copy(offsets, offsets + RS_, off);
    Vec part[RS_];
    for (int64_t t = 0; t < RS_; ++t) part[t] = Vec(T(0));
    for (int64_t oh = 0; oh < OH; ++oh) {
      const T* drow = dyp + oh * OW;
      const T* prow = P + oh * sh * width;
      for (int64_t c0 = 0; c0 < full; c0 += VS) {
        const Vec d = Vec::loadu(drow + c0);
        for (int64_t t = 0; t < RS_; ++t) part[t] = at::vec::fmadd(d, Vec::loadu(prow + off[t] + c0), part[t]);
      }
      if (tail > 0) {
        const Vec d = Vec::loadu(drow + full, tail);
        for (int64_t t = 0; t < RS_; ++t) part[t] = at::vec::fmadd(d, Vec::loadu(prow + off[t] + full), part[t]);
      }
    }
    for (int64_t t = 0; t < RS_; ++t) acc[t] += reduce(part[t]);
  } else {
    for (int64_t t = 0; t < RS; ++t) {
      Vec part(T(0));
      for (int64_t oh = 0; oh < OH; ++oh) {
        const T* drow = dyp + oh * OW;
        const T* src = P + oh * sh * width + offsets[t];
        for (int64_t c0 = 0; c0 < full; c0 += VS) part = at::vec::fmadd(Vec::loadu(drow + c0), Vec::loadu(src + c0), part);
        if (tail > 0) part = at::vec::fmadd(Vec::loadu(drow + full, tail), Vec::loadu(src + full), part);
      }
      acc[t] += reduce(part);
    }
  }
}

// P[oh * sh * width + off[t] + ow] += f[t] * dyp[oh, ow] for every tap t: a strided input
// gradient scattered into a padded plane of column phases (tap_offsets), where each tap
// adds unit-stride rows (the masked last vector adds zeros past OW).
template <typename T>
void scatter_padded_plane(const T* __restrict dyp, int64_t OH, int64_t OW, const T* __restrict f,
                          const int64_t* __restrict off, int64_t RS, int64_t sh, int64_t width, T* __restrict P) {
  using Vec = RowVec<T>;
  constexpr int64_t VS = Vec::size();
  // Tap by tap: consecutive rows do not overlap, where two taps' rows would (their
  // unaligned overlapping vectors defeat store-to-load forwarding).
  for (int64_t t = 0; t < RS; ++t) {
    const Vec fv(f[t]);
    for (int64_t oh = 0; oh < OH; ++oh) {
      const T* drow = dyp + oh * OW;
      T* dst = P + oh * sh * width + off[t];
      for (int64_t c0 = 0; c0 < OW; c0 += VS) {
        const Vec d = c0 + VS <= OW ? Vec::loadu(drow + c0) : Vec::loadu(drow + c0, OW - c0);
        at::vec::fmadd(fv, d, Vec::loadu(dst + c0)).store(dst + c0);
      }
    }
  }
}

// dx (H, W) = the padded plane of `phases` column phases (rows, width) at (h + ph, w + pw).
template <typename T>
void gather_padded_plane(const T* __restrict P, int64_t rows, int64_t width, int64_t phases, int64_t ph, int64_t pw,
                         T* __restrict dx, int64_t H, int64_t W) {
  using Vec = RowVec<T>;
  constexpr int64_t VS = Vec::size();
  const int64_t plane = rows * width;
  for (int64_t h = 0; h < H; ++h) {
    const T* prow = P + (h + ph) * width;
    T* drow = dx + h * W;
    int64_t w = 0;
    if (phases == 1) {
      std::memcpy(drow, prow + pw, W * sizeof(T));
      continue;
    }
    if (phases == 2) {
      if ((w + pw) & 1) {
        drow[w] = prow[plane + (w + pw) / 2];
        ++w;
      }
      for (; w + 2 * VS <= W; w += 2 * VS) {
        const int64_t c = (w + pw) / 2;
        const auto [lo, hi] = at::vec::interleave2(Vec::loadu(prow + c), Vec::loadu(prow + plane + c));
        lo.store(drow + w);
        hi.store(drow + w + VS);
      }
      for (; w < W; ++w) drow[w] = prow[((w + pw) & 1) * plane + (w + pw) / 2];
      continue;
    }
    for (; w < W; ++w) drow[w] = prow[((w + pw) % phases) * plane + (w + pw) / phases];
  }
}

// One input channel per group, NCHW: every plane is copied into a zero-padded scratch
// plane split into sw column phases (PaddedPlane), so all three kernels read or write
// unit-stride rows for any stride.
template <typename T>
void direct_forward_nchw(const T* x, const T* w, T* y, const Geom& g) {
  const int64_t OHW = g.OH * g.OW, RS = g.R * g.S, Kg = g.Kg();
  const int64_t rows = padded_rows(g.OH, g.R, g.sh, g.dh), width = padded_width<T>(g.OW, g.S, g.dw, g.sw);
  const std::vector<int64_t> off = tap_offsets(g.R, g.S, g.dh, g.dw, g.sw, rows, width);
  at::parallel_for(0, g.N * g.C, direct_grain(Kg * OHW * RS), [&](int64_t b, int64_t e) {
    PaddedPlane<T> pad(g.H, g.W, g.ph, g.pw, rows, width, g.sw);
    for (int64_t q = b; q < e; ++q) {  // per input plane: pad once, then every output plane of its group
      const int64_t n = q / g.C, c = q % g.C;
      const T* P = pad.load(x + q * g.H * g.W);
      for (int64_t k = c * Kg; k < (c + 1) * Kg; ++k)
        conv_padded_plane(P, width, off.data(), w + k * RS, y + (n * g.K + k) * OHW, g.OH, g.OW, RS, g.sh, false);
    }
  });
}

template <typename T>
void direct_input_grad_nchw(const T* dy, const T* w, T* dx, const Geom& g) {
  const int64_t OHW = g.OH * g.OW, RS = g.R * g.S, HW = g.H * g.W, Kg = g.Kg();
  if (g.sh == 1 && g.sw == 1) {
    // Stride 1: dx[h, w] = sum of w[r, s] * dy[h + ph - r*dh, w + pw - s*dw], a convolution
    // of dy (shifted by the flipped filter's reach) with the flipped filter.
    const int64_t rows = padded_rows(g.H, g.R, 1, g.dh), width = padded_width<T>(g.W, g.S, g.dw, 1);
    const int64_t top = (g.R - 1) * g.dh - g.ph, left = (g.S - 1) * g.dw - g.pw;
    const std::vector<int64_t> off = tap_offsets(g.R, g.S, g.dh, g.dw, 1, rows, width);
    at::parallel_for(0, g.N * g.C, direct_grain(Kg * HW * RS), [&](int64_t b, int64_t e) {
      PaddedPlane<T> pad(g.OH, g.OW, top, left, rows, width);
      std::vector<T> flipped(RS);
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = q / g.C, c = q % g.C;
        for (int64_t k = c * Kg; k < (c + 1) * Kg; ++k) {
          for (int64_t i = 0; i < RS; ++i) flipped[i] = w[k * RS + RS - 1 - i];
          const T* P = pad.load(dy + (n * g.K + k) * OHW);
          conv_padded_plane(P, width, off.data(), flipped.data(), dx + q * HW, g.H, g.W, RS, 1, k > c * Kg);
        }
      }
    });
    return;
  }
  // Strided: scatter every filter of the group into the padded input plane, then read dx
  // out of it (what lands in the padding is dropped).
  const int64_t rows = std::max(padded_rows(g.OH, g.R, g.sh, g.dh), g.ph + g.H);
  const int64_t width = std::max(padded_width<T>(g.OW, g.S, g.dw, g.sw), (g.pw + g.W + g.sw - 1) / g.sw);
  const std::vector<int64_t> off = tap_offsets(g.R, g.S, g.dh, g.dw, g.sw, rows, width);
  at::parallel_for(0, g.N * g.C, direct_grain(Kg * OHW * RS), [&](int64_t b, int64_t e) {
    std::vector<T> P(g.sw * rows * width);
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / g.C, c = q % g.C;
      std::fill(P.begin(), P.end(), T(0));
      for (int64_t k = c * Kg; k < (c + 1) * Kg; ++k)
        scatter_padded_plane(dy + (n * g.K + k) * OHW, g.OH, g.OW, w + k * RS, off.data(), RS, g.sh, width, P.data());
      gather_padded_plane(P.data(), rows, width, g.sw, g.ph, g.pw, dx + q * HW, g.H, g.W);
    }
  });
}

template <typename T>
void direct_weight_grad_nchw(const T* dy, const T* x, T* dw, const Geom& g) {
  const int64_t OHW = g.OH * g.OW, RS = g.R * g.S, HW = g.H * g.W;
  const int64_t rows = padded_rows(g.OH, g.R, g.sh, g.dh), width = padded_width<T>(g.OW, g.S, g.dw, g.sw);
  const std::vector<int64_t> off = tap_offsets(g.R, g.S, g.dh, g.dw, g.sw, rows, width);
  const auto plane = RS == 9 ? weight_grad_plane<T, 9> : weight_grad_plane<T, 0>;
  at::parallel_for(0, g.K, 1, [&](int64_t b, int64_t e) {
    PaddedPlane<T> pad(g.H, g.W, g.ph, g.pw, rows, width, g.sw);
    for (int64_t k = b; k < e; ++k) {
      T* dwk = dw + k * RS;
      std::fill(dwk, dwk + RS, T(0));
      const int64_t c = k / g.Kg();
      for (int64_t n = 0; n < g.N; ++n)
        plane(dy + (n * g.K + k) * OHW, g.OW, pad.load(x + (n * g.C + c) * HW), width, off.data(), dwk, g.OH, RS,
              g.sh);
    }
  });
}

// NHWC depthwise: wt is the filter as (R*S, C), so each tap is a unit-stride channel vector.
// Output pixels whose taps all fall inside the input go kPixels at a time, by blocks of up
// to two vectors of channels, their sums in registers over every tap; edge pixels take the
// same kernel one at a time with their valid taps only.
constexpr int64_t kPixels = 4;

// out[p * ostep + c] = sum over taps t < nt of tw[t][c] * tx[t][p * xstep + c], for p < PX and
// channels [c, c + NV vectors), or [c, c + cnt) when MASKED (NV 1).
template <typename T, int64_t NV, int64_t PX, bool MASKED>
inline void nhwc_block(const T* const* tx, const T* const* tw, int64_t nt, int64_t xstep, int64_t c, int64_t cnt,
                       T* __restrict out, int64_t ostep) {
  using Vec = RowVec<T>;
  constexpr int64_t VS = Vec::size();
  const auto load = [cnt](const T* p) { return MASKED ? Vec::loadu(p, cnt) : Vec::loadu(p); };
  Vec acc[PX][NV];
  for (int64_t p = 0; p < PX; ++p)
    for (int64_t v = 0; v < NV; ++v) acc[p][v] = Vec(T(0));
  for (int64_t t = 0; t < nt; ++t) {
    Vec wv[NV];
    for (int64_t v = 0; v < NV; ++v) wv[v] = load(tw[t] + c + v * VS);
    const T* xp = tx[t] + c;
    for (int64_t p = 0; p < PX; ++p)
      for (int64_t v = 0; v < NV; ++v) acc[p][v] = at::vec::fmadd(wv[v], load(xp + p * xstep + v * VS), acc[p][v]);
  }
  for (int64_t p = 0; p < PX; ++p)
    for (int64_t v = 0; v < NV; ++v) {
      if (MASKED) {
        acc[p][v].store(out + p * ostep + c, cnt);
      } else {
        acc[p][v].store(out + p * ostep + c + v * VS);
      }
    }
}

template <typename T, int64_t PX>
inline void nhwc_pixels(const T* const* tx, const T* const* tw, int64_t nt, int64_t xstep, int64_t C, T* out,
                        int64_t ostep) {
  constexpr int64_t VS = RowVec<T>::size();
  int64_t c = 0;
  for (; c + 2 * VS <= C; c += 2 * VS) nhwc_block<T, 2, PX, false>(tx, tw, nt, xstep, c, 0, out, ostep);
  for (; c + VS <= C; c += VS) nhwc_block<T, 1, PX, false>(tx, tw, nt, xstep, c, 0, out, ostep);
  if (c < C) nhwc_block<T, 1, PX, true>(tx, tw, nt, xstep, c, C - c, out, ostep);
}

// Output columns [lo, hi) whose taps s all read inside a row of IW (offset s * dw - pw).
inline void interior_columns(int64_t S, int64_t sw, int64_t dw, int64_t pw, int64_t IW, int64_t OW, int64_t& lo,
                             int64_t& hi) {
  lo = 0;
  hi = OW;
  for (int64_t s = 0; s < S; ++s) {
    int64_t l, h;
    valid_range(s * dw - pw, sw, IW, OW, l, h);
    lo = std::max(lo, l);
    hi = std::min(hi, h);
  }
  if (hi <= lo) lo = hi = 0;  // no interior: every column is an edge column
}

// A depthwise convolution in NHWC: out (N, OH, OW, C) from in (N, IH, IW, C) and wt (R*S, C);
// tap (r, s) of output (oh, ow) reads in[oh * sh - ph + r * dh, ow * sw - pw + s * dw] (ph and
// pw may be negative). Every output element is written.
template <typename T>
void depthwise_nhwc(const T* in, int64_t IH, int64_t IW, const T* wt, T* out, int64_t OH, int64_t OW, int64_t N,
                    int64_t C, int64_t R, int64_t S, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                    int64_t dw) {
  int64_t lo, hi;
  interior_columns(S, sw, dw, pw, IW, OW, lo, hi);
  at::parallel_for(0, N * OH, direct_grain(OW * C * R * S), [&](int64_t b, int64_t e) {
    std::vector<const T*> tx(R * S), tw(R * S);
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / OH, oh = t % OH;
      T* orow = out + t * OW * C;
      const auto row_of = [&](int64_t r) -> const T* {
        const int64_t h = oh * sh - ph + r * dh;
        return h < 0 || h >= IH ? nullptr : in + (n * IH + h) * IW * C;
      };
      int64_t nt = 0;  // interior: every tap of the valid filter rows, from column lo on
      for (int64_t r = 0; r < R; ++r) {
        const T* irow = row_of(r);
        if (irow == nullptr) continue;
        for (int64_t s = 0; s < S; ++s, ++nt) {
          tx[nt] = irow + (lo * sw - pw + s * dw) * C;
          tw[nt] = wt + (r * S + s) * C;
        }
      }
      int64_t ow = lo;
      for (; ow + kPixels <= hi; ow += kPixels) {
        nhwc_pixels<T, kPixels>(tx.data(), tw.data(), nt, sw * C, C, orow + ow * C, C);
        for (int64_t i = 0; i < nt; ++i) tx[i] += kPixels * sw * C;
      }
      for (; ow < hi; ++ow) {
        nhwc_pixels<T, 1>(tx.data(), tw.data(), nt, 0, C, orow + ow * C, C);
        for (int64_t i = 0; i < nt; ++i) tx[i] += sw * C;
      }
      for (int64_t ow = 0; ow < OW; ++ow) {  // edge columns: their valid taps only
        if (ow == lo) ow = std::max(hi, lo);
        if (ow >= OW) break;
        nt = 0;
        for (int64_t r = 0; r < R; ++r) {
          const T* irow = row_of(r);
          if (irow == nullptr) continue;
          for (int64_t s = 0; s < S; ++s) {
            const int64_t w = ow * sw - pw + s * dw;
            if (w < 0 || w >= IW) continue;
            tx[nt] = irow + w * C;
            tw[nt++] = wt + (r * S + s) * C;
          }
        }
        nhwc_pixels<T, 1>(tx.data(), tw.data(), nt, 0, C, orow + ow * C, C);
      }
    }
  });
}

template <typename T>
inline void fma_channels(const T* __restrict a, const T* __restrict x, T* __restrict y, int64_t C) {
  for (int64_t c = 0; c < C; ++c) y[c] += a[c] * x[c];
}

// Strided input gradient (stride 1 is depthwise_nhwc with the flipped filter).
template <typename T>
void direct_input_grad_nhwc(const T* dy, const T* wt, T* dx, const Geom& g) {
  const int64_t C = g.C;
  at::parallel_for(0, g.N * g.H, direct_grain(g.W * C * g.R * g.S), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / g.H, h = t % g.H;
      T* dxrow = dx + t * g.W * C;
      std::fill(dxrow, dxrow + g.W * C, T(0));
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t hh = h + g.ph - r * g.dh;  // = oh * sh
        if (hh < 0 || hh % g.sh != 0 || hh / g.sh >= g.OH) continue;
        const T* dyrow = dy + (n * g.OH + hh / g.sh) * g.OW * C;
        for (int64_t w = 0; w < g.W; ++w) {
          for (int64_t s = 0; s < g.S; ++s) {
            const int64_t ww = w + g.pw - s * g.dw;  // = ow * sw
            if (ww < 0 || ww % g.sw != 0 || ww / g.sw >= g.OW) continue;
            fma_channels(wt + (r * g.S + s) * C, dyrow + (ww / g.sw) * C, dxrow + w * C, C);
          }
        }
      }
    }
  });
}

// acc[s * C + c] += sum over pixels p < npix of dyp[p * C + c] * xp[p * xstep + s * sstep + c], for
// the S_ taps of one filter row and channels [c, c + NV vectors) (or [c, c + cnt), MASKED).
template <typename T, int64_t S_, int64_t NV, bool MASKED>
inline void nhwc_wgrad_block(const T* __restrict dyp, const T* __restrict xp, int64_t npix, int64_t C, int64_t xstep,
                             int64_t sstep, int64_t c, int64_t cnt, T* __restrict acc) {
  using Vec = RowVec<T>;
  constexpr int64_t VS = Vec::size();
  const auto load = [cnt](const T* p) { return MASKED ? Vec::loadu(p, cnt) : Vec::loadu(p); };
  Vec a[S_][NV];
  for (int64_t s = 0; s < S_; ++s)
    for (int64_t v = 0; v < NV; ++v) a[s][v] = load(acc + s * C + c + v * VS);
  for (int64_t p = 0; p < npix; ++p) {
    Vec d[NV];
    for (int64_t v = 0; v < NV; ++v) d[v] = load(dyp + p * C + c + v * VS);
    const T* xs = xp + p * xstep + c;
    for (int64_t s = 0; s < S_; ++s)
      for (int64_t v = 0; v < NV; ++v) a[s][v] = at::vec::fmadd(d[v], load(xs + s * sstep + v * VS), a[s][v]);
  }
  for (int64_t s = 0; s < S_; ++s)
    for (int64_t v = 0; v < NV; ++v) {
      if (MASKED) {
        a[s][v].store(acc + s * C + c, cnt);
      } else {
        a[s][v].store(acc + s * C + c + v * VS);
      }
    }
}

// The interior columns [lo, hi) of one output row and one filter row: with the filter width
// S_ known at compile time, its taps' sums stay in registers along the row.
template <typename T, int64_t S_>
void nhwc_wgrad_row(const T* dyp, const T* xp, int64_t npix, int64_t C, int64_t xstep, int64_t sstep, T* acc) {
  constexpr int64_t VS = RowVec<T>::size();
  int64_t c = 0;
  for (; c + 2 * VS <= C; c += 2 * VS) nhwc_wgrad_block<T, S_, 2, false>(dyp, xp, npix, C, xstep, sstep, c, 0, acc);
  for (; c + VS <= C; c += VS) nhwc_wgrad_block<T, S_, 1, false>(dyp, xp, npix, C, xstep, sstep, c, 0, acc);
  if (c < C) nhwc_wgrad_block<T, S_, 1, true>(dyp, xp, npix, C, xstep, sstep, c, C - c, acc);
}

template <typename T>
void direct_weight_grad_nhwc(const T* dy, const T* x, T* dwt, const Geom& g) {
  // dwt (R*S, C): per-chunk partial sums over fixed row ranges, added in chunk order.
  const int64_t C = g.C, RS = g.R * g.S, rows = g.N * g.OH;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), rows);
  int64_t lo, hi;
  interior_columns(g.S, g.sw, g.dw, g.pw, g.W, g.OW, lo, hi);
  using RowFn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, int64_t, T*);
  const RowFn interior = g.S == 3 ? nhwc_wgrad_row<T, 3> : g.S == 5 ? nhwc_wgrad_row<T, 5>
                       : g.S == 7 ? nhwc_wgrad_row<T, 7> : nullptr;
  if (interior == nullptr) lo = hi = 0;  // other filter widths: every column pixel by pixel
  std::vector<T> partial(chunks * RS * C, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t chunk = b; chunk < e; ++chunk) {
      T* acc = partial.data() + chunk * RS * C;
      for (int64_t t = chunk * rows / chunks; t < (chunk + 1) * rows / chunks; ++t) {
        const int64_t n = t / g.OH, oh = t % g.OH;
        const T* dyrow = dy + t * g.OW * C;
        for (int64_t r = 0; r < g.R; ++r) {
          const int64_t h = oh * g.sh - g.ph + r * g.dh;
          if (h < 0 || h >= g.H) continue;
          const T* xrow = x + (n * g.H + h) * g.W * C;
          if (hi > lo)
            interior(dyrow + lo * C, xrow + (lo * g.sw - g.pw) * C, hi - lo, C, g.sw * C, g.dw * C,
                     acc + r * g.S * C);
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            if (ow == lo && hi > lo) ow = hi;
            if (ow >= g.OW) break;
            for (int64_t s = 0; s < g.S; ++s) {
              const int64_t w = ow * g.sw - g.pw + s * g.dw;
              if (w < 0 || w >= g.W) continue;
              fma_channels(dyrow + ow * C, xrow + w * C, acc + (r * g.S + s) * C, C);
            }
          }
        }
      }
    }
  });
  std::fill(dwt, dwt + RS * C, T(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < RS * C; ++i) dwt[i] += partial[chunk * RS * C + i];
}

// y = conv(x, w): x (N, C, H, W), w (K, Cg, R, S), y (N, K, OH, OW), all dense in the layout.
void forward_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const Geom& g, bool cl) {
  const int64_t Cg = g.Cg(), Kg = g.Kg(), OHW = g.OH * g.OW, RS = g.R * g.S;
  const bool pointwise = g.pointwise();
  const int64_t slots = slots_for(g.N);
  if (one_channel_groups(g, cl)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_direct", [&] {
      if (cl) {
        const at::Tensor wt = w.view({g.K, RS}).t().contiguous();  // (R*S, C)
        depthwise_nhwc<scalar_t>(x.data_ptr<scalar_t>(), g.H, g.W, wt.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                 g.OH, g.OW, g.N, g.C, g.R, g.S, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw);
      } else {
        direct_forward_nchw<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g);
      }
    });
  } else if (batched_nchw(g, cl)) {
    const at::Tensor wm = w.reshape({g.K, Cg * RS});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_batched", [&] {
      for (int64_t grp = 0; grp < g.G; ++grp) {
        at::Tensor out = at::empty({Kg, g.N * OHW}, x.options());
        at::mm_out(out, wm.narrow(0, grp * Kg, Kg), im2col_all<scalar_t>(x, g, grp));
        y.narrow(1, grp * Kg, Kg).copy_(out.view({Kg, g.N, g.OH, g.OW}).permute({1, 0, 2, 3}));
      }
    });
  } else if (batched_nhwc(g, cl)) {
    const at::Tensor wt = w.view({g.K, Cg * RS});  // (K, C*R*S), the patches' order
    at::Tensor rows = nhwc_rows(y);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_batched_nhwc", [&] {
      at::mm_out(rows, im2col_nhwc_all<scalar_t>(x, g), wt.t());
    });
  } else if (use_taps(g, x, {forward_taps(g, cl)})) {
    run_taps(x, w, y, {forward_taps(g, cl)}, g, false);
  } else if (!cl) {
    const at::Tensor wm = w.reshape({g.K, Cg * RS});
    const int64_t rows = tile_rows(g, x.element_size());
    std::vector<at::Tensor> cols(slots);
    for (auto& col : cols) col = pointwise ? at::Tensor() : at::empty({Cg * RS * rows * g.OW}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward", [&] {
      for_each_image(g.N, [&](int64_t n, int64_t slot) {
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const at::Tensor xg = x[n].narrow(0, grp * Cg, Cg);
          const at::Tensor wg = wm.narrow(0, grp * Kg, Kg);
          at::Tensor out = y[n].narrow(0, grp * Kg, Kg).view({Kg, OHW});
          if (pointwise) {
            at::mm_out(out, wg, xg.reshape({Cg, OHW}));
            continue;
          }
          for (int64_t oh0 = 0; oh0 < g.OH; oh0 += rows) {  // patch tiles that stay in cache
            const int64_t oh1 = std::min(g.OH, oh0 + rows), pixels = (oh1 - oh0) * g.OW;
            at::Tensor col = cols[slot].narrow(0, 0, Cg * RS * pixels).view({Cg * RS, pixels});
            im2col_nchw<scalar_t>(xg.data_ptr<scalar_t>(), col.data_ptr<scalar_t>(), g, oh0, oh1);
            at::Tensor tile = out.narrow(1, oh0 * g.OW, pixels);
            at::mm_out(tile, wg, col);
          }
        }
      });
    });
  } else {
    const at::Tensor wt = w.permute({0, 2, 3, 1}).contiguous().view({g.K, RS * Cg});  // (K, R*S*Cg)
    const int64_t rows = tile_rows(g, x.element_size());
    std::vector<at::Tensor> cols(slots), outs(slots);
    for (int64_t i = 0; i < slots; ++i) {
      if (!(pointwise && g.G == 1)) cols[i] = at::empty({rows * g.OW, RS * Cg}, x.options());
      if (g.G > 1) outs[i] = at::empty({rows * g.OW, Kg}, x.options());
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward_nhwc", [&] {
      for_each_image(g.N, [&](int64_t n, int64_t slot) {
        const scalar_t* xn = x.data_ptr<scalar_t>() + n * g.H * g.W * g.C;
        at::Tensor yn = y[n].permute({1, 2, 0}).reshape({OHW, g.K});  // a view: y is NHWC-dense
        if (pointwise && g.G == 1) {
          at::mm_out(yn, x[n].permute({1, 2, 0}).reshape({OHW, g.C}), wt.t());
          return;
        }
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const at::Tensor wg = wt.narrow(0, grp * Kg, Kg).t();
          for (int64_t oh0 = 0; oh0 < g.OH; oh0 += rows) {  // patch tiles that stay in cache
            const int64_t oh1 = std::min(g.OH, oh0 + rows), pixels = (oh1 - oh0) * g.OW;
            const at::Tensor col = cols[slot].narrow(0, 0, pixels);
            im2col_nhwc<scalar_t>(xn, col.data_ptr<scalar_t>(), g, grp * Cg, oh0, oh1);
            at::Tensor tile = yn.narrow(0, oh0 * g.OW, pixels);
            if (g.G == 1) {
              at::mm_out(tile, col, wg);
            } else {
              at::Tensor out = outs[slot].narrow(0, 0, pixels);
              at::mm_out(out, col, wg);
              tile.narrow(1, grp * Kg, Kg).copy_(out);
            }
          }
        }
      });
    });
  }
}

// dx = conv's input gradient of dy: dy (N, K, OH, OW), w (K, Cg, R, S), dx (N, C, H, W).
void input_grad_impl(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dx, const Geom& g, bool cl) {
  const int64_t Cg = g.Cg(), Kg = g.Kg(), OHW = g.OH * g.OW, RS = g.R * g.S;
  const bool pointwise = g.pointwise();
  const int64_t slots = slots_for(g.N);
  if (one_channel_groups(g, cl)) {  // writes every element of dx
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_input_grad_direct", [&] {
      if (cl && g.sh == 1 && g.sw == 1) {
        // Stride 1: dx is dy convolved with the flipped filter (tap order reversed),
        // padded by the filter's reach less the padding.
        const at::Tensor wt = w.view({g.K, RS}).flip(1).t().contiguous();  // (R*S, C), flipped
        depthwise_nhwc<scalar_t>(dy.data_ptr<scalar_t>(), g.OH, g.OW, wt.data_ptr<scalar_t>(),
                                 dx.data_ptr<scalar_t>(), g.H, g.W, g.N, g.C, g.R, g.S, 1, 1,
                                 (g.R - 1) * g.dh - g.ph, (g.S - 1) * g.dw - g.pw, g.dh, g.dw);
      } else if (cl) {
        const at::Tensor wt = w.view({g.K, RS}).t().contiguous();  // (R*S, C)
        direct_input_grad_nhwc<scalar_t>(dy.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), g);
      } else {
        direct_input_grad_nchw<scalar_t>(dy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), g);
      }
    });
    return;
  }
  bool uncovered = false;
  const std::vector<TapPart> parts = input_grad_parts(g, cl, &uncovered);
  if (use_taps(g, dy, parts)) {  // writes every element of dx a part covers
    if (uncovered) dx.zero_();
    run_taps(dy, w, dx, parts, g, true);
    return;
  }
  dx.zero_();  // col2im adds into it
  if (batched_nhwc(g, cl)) {
    at::Tensor dcol = at::empty({g.N * OHW, RS * Cg}, dy.options());  // (C, R, S) order
    at::mm_out(dcol, nhwc_rows(dy), w.view({g.K, Cg * RS}));
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_input_grad_batched_nhwc", [&] {
      const scalar_t* pc = dcol.data_ptr<scalar_t>();
      scalar_t* px = dx.data_ptr<scalar_t>();
      at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          col2im_nhwc_crs<scalar_t>(pc + n * OHW * RS * Cg, px + n * g.H * g.W * g.C, g);
      });
    });
    return;
  }
  if (batched_nchw(g, cl)) {
    const at::Tensor wm = w.reshape({g.K, Cg * RS});
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_input_grad_batched", [&] {
      for (int64_t grp = 0; grp < g.G; ++grp) {
        at::Tensor prod = at::empty({Cg * RS, g.N * OHW}, dy.options());
        at::mm_out(prod, wm.narrow(0, grp * Kg, Kg).t(), grad_all(dy, g, grp));
        scalar_t* pdx = dx.data_ptr<scalar_t>();
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (register_plane(g, OHW)) {  // image n's columns in place: rows N*OHW apart
            const float* pc = prod.data_ptr<float>();
            float* pxf = dx.data_ptr<float>();  // (this branch is compiled for every dtype)
            at::parallel_for(0, g.N * Cg, 16, [&](int64_t b, int64_t e) {
              for (int64_t q = b; q < e; ++q) {
                const int64_t n = q / Cg, c = q % Cg;
                col2im_register_plane(pc + n * OHW, pxf + (n * g.C + grp * Cg) * g.H * g.W, g, 0, g.OH, g.N * OHW,
                                      c, c + 1);
              }
            });
            continue;
          }
        }
#endif
        // (N, Cg*RS, OHW): each image's columns contiguous for its col2im
        const at::Tensor dcol = prod.view({Cg * RS, g.N, OHW}).permute({1, 0, 2}).contiguous();
        scalar_t* pc = dcol.data_ptr<scalar_t>();
        at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
          for (int64_t n = b; n < e; ++n)
            col2im_nchw<scalar_t>(pc + n * Cg * RS * OHW, pdx + (n * g.C + grp * Cg) * g.H * g.W, g, 0, g.OH);
        });
      }
    });
  } else if (!cl) {
    const at::Tensor wm = w.reshape({g.K, Cg * RS});
    const int64_t rows = tile_rows(g, dy.element_size());
    const bool phases = g.sw == 2 && !pointwise;
    std::vector<at::Tensor> cols(slots), split(slots);
    for (int64_t i = 0; i < slots; ++i) {
      if (!pointwise) cols[i] = at::empty({Cg * RS * rows * g.OW}, dy.options());
      if (phases) split[i] = at::empty({Cg * g.H * 2 * phase_half(g)}, dy.options());
    }
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_input_grad", [&] {
      for_each_image(g.N, [&](int64_t n, int64_t slot) {
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const at::Tensor dyg = dy[n].narrow(0, grp * Kg, Kg).reshape({Kg, OHW});
          const at::Tensor wg = wm.narrow(0, grp * Kg, Kg).t();  // (Cg*RS, Kg)
          at::Tensor dxg = dx[n].narrow(0, grp * Cg, Cg);
          if (pointwise) {
            at::Tensor out = dxg.view({Cg, OHW});
            at::mm_out(out, wg, dyg);
            continue;
          }
          if (phases) split[slot].zero_();
          for (int64_t oh0 = 0; oh0 < g.OH; oh0 += rows) {  // patch-gradient tiles that stay in cache
            const int64_t oh1 = std::min(g.OH, oh0 + rows), pixels = (oh1 - oh0) * g.OW;
            at::Tensor dcol = cols[slot].narrow(0, 0, Cg * RS * pixels).view({Cg * RS, pixels});
            at::mm_out(dcol, wg, dyg.narrow(1, oh0 * g.OW, pixels));
            if (phases) {
              col2im_nchw_phases<scalar_t>(dcol.data_ptr<scalar_t>(), split[slot].data_ptr<scalar_t>(), g, oh0, oh1);
            } else {
              col2im_nchw<scalar_t>(dcol.data_ptr<scalar_t>(), dxg.data_ptr<scalar_t>(), g, oh0, oh1);
            }
          }
          if (phases) interleave_phases<scalar_t>(split[slot].data_ptr<scalar_t>(), dxg.data_ptr<scalar_t>(), g);
        }
      });
    });
  } else {
    const at::Tensor wt = w.permute({0, 2, 3, 1}).contiguous().view({g.K, RS * Cg});
    const int64_t rows = tile_rows(g, dy.element_size());
    std::vector<at::Tensor> cols(slots);
    for (auto& col : cols) col = at::empty({rows * g.OW, RS * Cg}, dy.options());
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_input_grad_nhwc", [&] {
      for_each_image(g.N, [&](int64_t n, int64_t slot) {
        const at::Tensor dyn = dy[n].permute({1, 2, 0}).reshape({OHW, g.K});
        scalar_t* dxn = dx.data_ptr<scalar_t>() + n * g.H * g.W * g.C;
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const at::Tensor dyg = dyn.narrow(1, grp * Kg, Kg);
          const at::Tensor wg = wt.narrow(0, grp * Kg, Kg);  // (Kg, RS*Cg)
          if (pointwise && g.G == 1) {
            at::Tensor out = dx[n].permute({1, 2, 0}).reshape({OHW, g.C});
            at::mm_out(out, dyg, wg);
          } else {
            for (int64_t oh0 = 0; oh0 < g.OH; oh0 += rows) {  // patch-gradient tiles that stay in cache
              const int64_t oh1 = std::min(g.OH, oh0 + rows), pixels = (oh1 - oh0) * g.OW;
              at::Tensor dcol = cols[slot].narrow(0, 0, pixels);
              at::mm_out(dcol, dyg.narrow(0, oh0 * g.OW, pixels), wg);
              col2im_nhwc<scalar_t>(dcol.data_ptr<scalar_t>(), dxn, g, grp * Cg, oh0, oh1);
            }
          }
        }
      });
    });
  }
}

// dw = conv's weight gradient: dy (N, K, OH, OW), x (N, C, H, W), dw (K, Cg, R, S) contiguous.
void weight_grad_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw, const Geom& g, bool cl) {
  const int64_t Cg = g.Cg(), Kg = g.Kg(), OHW = g.OH * g.OW, RS = g.R * g.S;
  const bool pointwise = g.pointwise();
  const int64_t slots = slots_for(g.N);
  if (one_channel_groups(g, cl)) {
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_weight_grad_direct", [&] {
      if (cl) {
        at::Tensor dwt = at::empty({RS, g.K}, dw.options());
        direct_weight_grad_nhwc<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dwt.data_ptr<scalar_t>(), g);
        dw.view({g.K, RS}).copy_(dwt.t());
      } else {
        direct_weight_grad_nchw<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), g);
      }
    });
    return;
  }
  if (use_taps(g, x, {forward_taps(g, cl)}, true)) {
    const TapConv tc = forward_taps(g, cl).tc;
    for (int64_t grp = 0; grp < g.G; ++grp) {
      // a group's channels: a slice of each pixel (channels_last) or of the planes
      tap_conv_weight_grad(x.data_ptr<float>() + grp * Cg * (cl ? 1 : g.H * g.W),
                           dy.data_ptr<float>() + grp * Kg * (cl ? 1 : OHW),
                           dw.data_ptr<float>() + grp * Kg * Cg * RS, tc);
    }
    return;
  }
  if (batched_nhwc(g, cl)) {
    at::Tensor dwm = dw.view({g.K, Cg * RS});  // the patches' (C, R, S) order
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_weight_grad_batched_nhwc", [&] {
      at::mm_out(dwm, nhwc_rows(dy).t(), im2col_nhwc_all<scalar_t>(x, g));
    });
    return;
  }
  if (batched_nchw(g, cl)) {
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_weight_grad_batched", [&] {
      for (int64_t grp = 0; grp < g.G; ++grp) {
        at::Tensor out = dw.view({g.K, Cg * RS}).narrow(0, grp * Kg, Kg);  // contiguous rows
        at::mm_out(out, grad_all(dy, g, grp), im2col_all<scalar_t>(x, g, grp).t());
      }
    });
    return;
  }
  // per-slot partial sums, (K, Cg*RS) in NCHW order or (K, RS*Cg) in NHWC order
  const at::Tensor partial = at::zeros({slots, g.K, Cg * RS}, dy.options());
  const int64_t rows = tile_rows(g, x.element_size());
  std::vector<at::Tensor> cols(slots);
  for (auto& col : cols) {
    if (!pointwise || (cl && g.G > 1)) col = cl ? at::empty({OHW, RS * Cg}, x.options()) : at::empty({Cg * RS * rows * g.OW}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "conv2d_weight_grad", [&] {
    for_each_image(g.N, [&](int64_t n, int64_t slot) {
      at::Tensor acc = partial[slot];
      if (!cl) {
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const at::Tensor xg = x[n].narrow(0, grp * Cg, Cg);
          const at::Tensor dyg = dy[n].narrow(0, grp * Kg, Kg).reshape({Kg, OHW});
          at::Tensor out = acc.narrow(0, grp * Kg, Kg);
          if (pointwise) {
            out.addmm_(dyg, xg.reshape({Cg, OHW}).t());
            continue;
          }
          for (int64_t oh0 = 0; oh0 < g.OH; oh0 += rows) {  // patch tiles that stay in cache
            const int64_t oh1 = std::min(g.OH, oh0 + rows), pixels = (oh1 - oh0) * g.OW;
            at::Tensor col = cols[slot].narrow(0, 0, Cg * RS * pixels).view({Cg * RS, pixels});
            im2col_nchw<scalar_t>(xg.data_ptr<scalar_t>(), col.data_ptr<scalar_t>(), g, oh0, oh1);
            out.addmm_(dyg.narrow(1, oh0 * g.OW, pixels), col.t());
          }
        }
      } else {
        const at::Tensor dyn = dy[n].permute({1, 2, 0}).reshape({OHW, g.K});
        const scalar_t* xn = x.data_ptr<scalar_t>() + n * g.H * g.W * g.C;
        for (int64_t grp = 0; grp < g.G; ++grp) {
          at::Tensor col;
          if (pointwise && g.G == 1) {
            col = x[n].permute({1, 2, 0}).reshape({OHW, g.C});
          } else {
            col = cols[slot];
            im2col_nhwc<scalar_t>(xn, col.data_ptr<scalar_t>(), g, grp * Cg, 0, g.OH);
          }
          at::Tensor out = acc.narrow(0, grp * Kg, Kg);
          out.addmm_(dyn.narrow(1, grp * Kg, Kg).t(), col);
        }
      }
    });
  });
  at::Tensor total = partial[0];
  for (int64_t i = 1; i < slots; ++i) total.add_(partial[i]);  // fixed order
  if (!cl) {
    dw.view({g.K, Cg * RS}).copy_(total);
  } else {
    dw.copy_(total.view({g.K, g.R, g.S, Cg}).permute({0, 3, 1, 2}));
  }
}

template <typename Fn>
void in_float32(const std::vector<at::Tensor>& inputs, const at::Tensor& out, Fn fn) {
  // float16/bfloat16: compute in float32 (exact products, float32 sums), round once.
  std::vector<at::Tensor> up;
  for (const auto& t : inputs) up.push_back(t.defined() ? t.to(at::kFloat) : t);
  at::Tensor out32 = at::empty_like(out, out.options().dtype(at::kFloat));
  fn(up, out32);
  out.copy_(out32);
}

void check_inputs(std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  const at::Tensor* first = ts.begin()->first;
  for (const auto& [t, name] : ts) {
    TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), name, " must be floating-point, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == first->scalar_type(), "conv2d: expected ", name, " to have dtype ",
                first->scalar_type(), ", got ", t->scalar_type());
  }
}

}  // namespace

// The entries below hold at::AutoDispatchBelowADInplaceOrView (kernel_views) while they run:
// the per-image and per-group views and GEMM operands they make (~200 view ops for a
// small layer's forward and backward) are kernel internals, so they skip autograd's view
// tracking and version counters (for_each_image carries the setting to its threads). A
// small model's training step ran ~3% faster, its inference pass ~5%.
void conv2d_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& y, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups, bool channels_last) {
  const at::AutoDispatchBelowADInplaceOrView kernel_views;
  check_inputs({{&x, "input"}, {&w, "weight"}, {&y, "output"}});
  const Geom g = make_geom(x, w, y, stride, padding, dilation, groups);
  TORCH_CHECK(y.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "conv2d_forward: output must be dense in the requested layout");
  if (y.numel() == 0) return;
  const at::Tensor xd = dense_as(x, channels_last), wd = w.contiguous();
  if (is_reduced(y)) {
    in_float32({xd, wd}, y, [&](const std::vector<at::Tensor>& t, const at::Tensor& out) {
      forward_impl(t[0], t[1], out, g, channels_last);
      if (bias.has_value()) add_bias(out, bias->to(at::kFloat).contiguous(), channels_last);
    });
  } else {
    forward_impl(xd, wd, y, g, channels_last);
    if (bias.has_value()) add_bias(y, bias->contiguous(), channels_last);
  }
}

void conv2d_input_grad(const at::Tensor& dy, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& dx, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool channels_last) {
  const at::AutoDispatchBelowADInplaceOrView kernel_views;
  check_inputs({{&dy, "grad_output"}, {&w, "weight"}, {&dx, "grad_input"}});
  const Geom g = make_geom(dx, w, dy, stride, padding, dilation, groups);
  TORCH_CHECK(dx.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "conv2d_input_grad: grad_input must be dense in the requested layout");
  if (dx.numel() == 0) return;
  if (dy.numel() == 0) {
    dx.zero_();
  } else {
    const at::Tensor dyd = dense_as(dy, channels_last), wd = w.contiguous();
    if (is_reduced(dx)) {
      in_float32({dyd, wd}, dx, [&](const std::vector<at::Tensor>& t, const at::Tensor& out) {
        input_grad_impl(t[0], t[1], out, g, channels_last);
        if (bias.has_value()) add_bias(out, bias->to(at::kFloat).contiguous(), channels_last);
      });
      return;
    }
    input_grad_impl(dyd, wd, dx, g, channels_last);
  }
  if (bias.has_value()) add_bias(dx, bias->contiguous(), channels_last);
}

void conv2d_weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool channels_last) {
  const at::AutoDispatchBelowADInplaceOrView kernel_views;
  check_inputs({{&dy, "grad_output"}, {&x, "input"}, {&dw, "grad_weight"}});
  const Geom g = make_geom(x, dw, dy, stride, padding, dilation, groups);
  TORCH_CHECK(dw.is_contiguous(), "conv2d_weight_grad: grad_weight must be contiguous");
  if (dw.numel() == 0) return;
  if (dy.numel() == 0 || x.numel() == 0) {
    dw.zero_();
    return;
  }
  const at::Tensor dyd = dense_as(dy, channels_last), xd = dense_as(x, channels_last);
  if (is_reduced(dw)) {
    in_float32({dyd, xd}, dw, [&](const std::vector<at::Tensor>& t, const at::Tensor& out) {
      weight_grad_impl(t[0], t[1], out, g, channels_last);
    });
  } else {
    weight_grad_impl(dyd, xd, dw, g, channels_last);
  }
}

// out[k] = sum over n, h, w of g[n, k, h, w] (the bias gradient); g dense NCHW or NHWC.
void channel_sum(const at::Tensor& grad, const at::Tensor& out, bool channels_last) {
  check_inputs({{&grad, "grad_output"}, {&out, "grad_bias"}});
  const at::Tensor gd = dense_as(grad, channels_last);
  const int64_t N = gd.size(0), K = gd.size(1), HW = gd.size(2) * gd.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd.scalar_type(), "channel_sum", [&] {
    // double sums: a bias gradient adds up N*H*W values that often cancel to near zero,
    // where float sums of a few thousand terms keep only ~1e-3 of absolute accuracy
    using acc_t = double;
    const scalar_t* p = gd.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (!channels_last) {
      at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          acc_t total = 0;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* plane = p + (n * K + k) * HW;
            // eight independent chains (one add chain is latency-bound at ~1 value per 4 cycles;
            // these vectorise), combined in a fixed order
            acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tail = 0;
            int64_t i = 0;
            for (; i + 8 <= HW; i += 8) {
              for (int64_t j = 0; j < 8; ++j) s[j] += static_cast<acc_t>(plane[i + j]);
            }
            for (; i < HW; ++i) tail += static_cast<acc_t>(plane[i]);
            total += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
          }
          o[k] = static_cast<scalar_t>(total);
        }
      });
    } else {
      std::vector<acc_t> total(K, acc_t(0));
      const int64_t rows = N * HW;
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* row = p + i * K;
        for (int64_t k = 0; k < K; ++k) total[k] += static_cast<acc_t>(row[k]);
      }
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<scalar_t>(total[k]);
    }
  });
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ConvConf {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  bool channels_last;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["channels_last"] = channels_last;
  }
  static ConvConf load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt(),
            ctx->saved_data["channels_last"].toBool()};
  }
  at::TensorOptions layout(const at::Tensor& like) const {
    return like.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                      : at::MemoryFormat::Contiguous);
  }
};

// conv2d (transposed = false) or conv_transpose2d as a C++ autograd node (see autograd.h),
// with the same entries as Conv2dFunction / ConvTranspose2dFunction: conv_transpose2d's
// forward is conv2d's input gradient, its input gradient conv2d's forward and its weight
// gradient conv2d's with input and output gradient swapped. Non-empty x and w only (the
// Python Functions handle empty ones).
//
// As in Python, the family is closed under differentiation: when the backward's own graph
// is recorded (create_graph), the gradients are these nodes again (the input gradient is
// the other direction's ConvNode, the weight gradient ConvWeightGradNode, the bias
// gradient ChannelSumNode), so they differentiate to any order.
struct ConvNode : public torch::autograd::Function<ConvNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                            std::vector<int64_t> out_hw, bool channels_last, bool transposed) {
    const ConvConf conf{std::move(stride), std::move(padding), std::move(dilation), groups, channels_last};
    const at::Tensor y = output(x, w, bias, conf, out_hw, transposed);
    ctx->save_for_backward({x, w});
    conf.save(ctx);
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["has_bias"] = static_cast<bool>(given(bias));
    return y;
  }

  // conv2d(x, w) + bias, or conv_transpose2d, in the layout conf asks for.
  static at::Tensor output(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           const ConvConf& conf, const std::vector<int64_t>& out_hw, bool transposed) {
    TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && out_hw.size() == 2, "conv: 4-D input and weight expected");
    at::Tensor y = at::empty({x.size(0), transposed ? w.size(1) * conf.groups : w.size(0), out_hw[0], out_hw[1]},
                             conf.layout(x));
    (transposed ? conv2d_input_grad : conv2d_forward)(x, w, bias, y, conf.stride, conf.padding, conf.dilation,
                                                      conf.groups, conf.channels_last);
    return y;
  }

  static at::Tensor apply_conf(const at::Tensor& x, const at::Tensor& w, const ConvConf& c,
                               std::vector<int64_t> out_hw, bool transposed) {
    return ConvNode::apply(x, w, c10::optional<at::Tensor>(), c.stride, c.padding, c.dilation, c.groups,
                           std::move(out_hw), c.channels_last, transposed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

// conv2d's weight gradient as a function of (output gradient dy, input x): bilinear, its
// gradient with respect to dy is conv2d(x, gg), with respect to x conv_transpose2d(dy, gg).
struct ConvWeightGradNode : public torch::autograd::Function<ConvWeightGradNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& dy, const at::Tensor& x,
                            std::vector<int64_t> weight_size, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                            bool channels_last) {
    const ConvConf conf{std::move(stride), std::move(padding), std::move(dilation), groups, channels_last};
    at::Tensor dw = at::empty(weight_size, dy.options().memory_format(at::MemoryFormat::Contiguous));
    conv2d_weight_grad(dy, x, dw, conf.stride, conf.padding, conf.dilation, groups, channels_last);
    ctx->save_for_backward({dy, x});
    conf.save(ctx);
    return dw;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &dy = saved[0], &x = saved[1], &gg = grads[0];
    const ConvConf conf = ConvConf::load(ctx);
    variable_list out(8);
    if (ctx->needs_input_grad(0)) out[0] = ConvNode::apply_conf(x, gg, conf, hw_of(dy), false);
    if (ctx->needs_input_grad(1)) out[1] = ConvNode::apply_conf(dy, gg, conf, hw_of(x), true);
    return out;
  }
};

// Per-channel sum of an (N, C, H, W) gradient (the bias gradient); its gradient broadcasts back.
struct ChannelSumNode : public torch::autograd::Function<ChannelSumNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, bool channels_last) {
    at::Tensor out = at::empty({g.size(1)}, g.options());
    channel_sum(g, out, channels_last);
    ctx->saved_data["sizes"] = g.sizes().vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0].view({1, -1, 1, 1}).expand(ctx->saved_data["sizes"].toIntVector()), at::Tensor()};
  }
};

variable_list ConvNode::backward(AutogradContext* ctx, variable_list grads) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &w = saved[1], &g = grads[0];
  const ConvConf c = ConvConf::load(ctx);
  const bool transposed = ctx->saved_data["transposed"].toBool();
  const bool bias_grad = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
  // the weight gradient's (conv output gradient, conv input): swapped for the transposed conv
  const at::Tensor &wg_dy = transposed ? x : g, &wg_x = transposed ? g : x;
  variable_list out(10);
  if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
    if (ctx->needs_input_grad(0)) out[0] = ConvNode::apply_conf(g, w, c, hw_of(x), !transposed);
    if (ctx->needs_input_grad(1)) {
      out[1] = ConvWeightGradNode::apply(wg_dy, wg_x, w.sizes().vec(), c.stride, c.padding, c.dilation, c.groups,
                                         c.channels_last);
    }
    if (bias_grad) out[2] = ChannelSumNode::apply(g, c.channels_last);
    return out;
  }
  if (ctx->needs_input_grad(0)) {
    out[0] = at::empty(x.sizes(), c.layout(x));
    if (transposed) {
      conv2d_forward(g, w, c10::nullopt, out[0], c.stride, c.padding, c.dilation, c.groups, c.channels_last);
    } else {
      conv2d_input_grad(g, w, c10::nullopt, out[0], c.stride, c.padding, c.dilation, c.groups, c.channels_last);
    }
  }
  if (ctx->needs_input_grad(1)) {
    out[1] = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
    conv2d_weight_grad(wg_dy, wg_x, out[1], c.stride, c.padding, c.dilation, c.groups, c.channels_last);
  }
  if (bias_grad) {
    out[2] = at::empty({g.size(1)}, g.options());
    channel_sum(g, out[2], c.channels_last);
  }
  return out;
}

}  // namespace

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                           int64_t groups, std::vector<int64_t> out_hw, bool channels_last, bool transposed) {
  if (records_node({x, w, bias.value_or(at::Tensor())}))
    return ConvNode::apply(x, w, bias, stride, padding, dilation, groups, out_hw, channels_last, transposed);
  const ConvConf conf{std::move(stride), std::move(padding), std::move(dilation), groups, channels_last};
  return ConvNode::output(x, w, bias, conf, out_hw, transposed);
}

}  // namespace pyops
