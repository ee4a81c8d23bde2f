// Direct NCHW float32 convolution by register-blocked taps.
//
// im2col + BLAS runs 3x3 convolutions at BLAS's rate on its worst operand shapes (64
// output channels, 576-long reductions), about half this CPU's FMA peak. Here the
// input is copied once per image into zero-padded planes, split by stride phase, so that
// for output pixels numbered q = oh * Wq + ow (Wq >= OW: a row also holds the few
// columns past the output's right edge) every tap (r, s) of every input channel reads
// one contiguous run at a fixed offset from q. The patch matrix then never exists: a
// micro-kernel holds an MR x NR block of outputs (MR output channels by NR consecutive
// q) in vector registers, and for each input channel and tap loads NR inputs and
// broadcasts MR weights, MR * NR / lanes independent FMAs per step. Columns past OW are
// computed and dropped (the caller only takes shapes where they are a small share).
//
// Stride (sh, sw): phase (a, b) of a padded plane holds its rows a, a + sh, ... and
// columns b, b + sw, ...; tap (r, s) reads phase ((r*dh) % sh, (s*dw) % sw) shifted by
// ((r*dh) / sh, (s*dw) / sw), so every stride and dilation is a unit-stride read.
//
// channels_last input is copied into the same padded positions, each holding its Cin
// channels (position stride row_stride(Cin) and channel stride 1, instead of 1 and the
// phase planes): only the channel-lane kernel below runs it, whose broadcasts read one
// float at a time, and the weight-gradient kernel.
//
// Images are spread over threads when there are at least as many as threads, else each
// image's output blocks are; every output element is written by one task (deterministic).
#include "conv_taps.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pyops {
namespace {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveKernel = true;
#else
constexpr bool kHaveKernel = false;  // at::vec would emulate lanes in scalar code: im2col + BLAS is faster
#endif

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// 24 accumulators of 32 zmm registers (AVX-512), 12 of 16 ymm (AVX2).
constexpr int64_t MR = kLanes == 16 ? 8 : 4;
constexpr int64_t NV = 3;
constexpr int64_t NR = NV * kLanes;

// Floats between rows of n floats (n > 0) read column-wise: whole vectors, an odd number of
// 64-byte lines, so that a walk down a column spreads over the L1 cache's sets (rows of a
// power of two of lines, 256 channels say, share a sixteenth of them and evict each other).
inline int64_t row_stride(int64_t n) {
  const int64_t s = (n + 15) / 16 * 16;
  return s % 32 == 0 ? s + 16 : s;
}

struct Layout {
  int64_t Hq, Wq;     // phase plane size
  int64_t phase;      // Hq * Wq
  int64_t plane;      // sh * sw phases: one channel's padded input
  int64_t Q, blocks;  // output positions q (OH * Wq) and NR-blocks of them
  int64_t scratch;    // floats of one image's padded input, with the last block's overrun
  int64_t ps, cs;     // floats from one position to the next and from one channel to the next
  std::vector<int64_t> offs;  // per tap: where its run starts, relative to q
  std::vector<char> row_used, col_used;  // the stride phases some tap reads
};

Layout layout_of(const TapConv& c) {
  Layout l;
  l.Hq = c.OH + ((c.R - 1) * c.dh) / c.sh;
  l.Wq = c.OW + ((c.S - 1) * c.dw) / c.sw;
  l.phase = l.Hq * l.Wq;
  l.plane = c.sh * c.sw * l.phase;
  l.Q = c.OH * l.Wq;
  l.blocks = (l.Q + NR - 1) / NR;
  l.row_used.assign(c.sh, 0);
  l.col_used.assign(c.sw, 0);
  for (int64_t r = 0; r < c.R; ++r) l.row_used[(r * c.dh) % c.sh] = 1;
  for (int64_t s = 0; s < c.S; ++s) l.col_used[(s * c.dw) % c.sw] = 1;
  int64_t last = 0;
  for (int64_t r = 0; r < c.R; ++r) {
    for (int64_t s = 0; s < c.S; ++s) {
      const int64_t a = (r * c.dh) % c.sh, b = (s * c.dw) % c.sw;
      l.offs.push_back((a * c.sw + b) * l.phase + (r * c.dh) / c.sh * l.Wq + (s * c.dw) / c.sw);
      last = std::max(last, l.offs.back());
    }
  }
  // every channel's phases, and the last block's junk lanes, which read up to
  // blocks * NR - 1 past the last channel's last tap start
  l.scratch = std::max(c.Cin * l.plane, (c.Cin - 1) * l.plane + last + l.blocks * NR);
  l.ps = c.x_pixel ? row_stride(c.Cin) : 1;
  l.cs = c.x_pixel ? 1 : l.plane;
  if (c.x_pixel) l.scratch = l.plane * l.ps;
  return l;
}

// channels_last: P[a][b][i][j][c], each position's Cin channels copied as one run (ps
// floats apart; the floats past Cin are never read).
void fill_padded_nhwc(const float* __restrict x, float* __restrict P, const TapConv& c, const Layout& l) {
  const int64_t ps = l.ps;
  for (int64_t a = 0; a < c.sh; ++a) {
    if (!l.row_used[a]) continue;
    for (int64_t b = 0; b < c.sw; ++b) {
      if (!l.col_used[b]) continue;
      float* dst = P + (a * c.sw + b) * l.phase * ps;
      const int64_t off = b - c.pw;
      int64_t lo, hi;
      valid_range(off, c.sw, c.W, l.Wq, lo, hi);
      for (int64_t i = 0; i < l.Hq; ++i, dst += l.Wq * ps) {
        const int64_t h = a + i * c.sh - c.ph;
        if (h < 0 || h >= c.H || lo == hi) {
          std::fill(dst, dst + l.Wq * ps, 0.f);
          continue;
        }
        std::fill(dst, dst + lo * ps, 0.f);
        const float* src = x + (h * c.W + lo * c.sw + off) * c.x_pixel;
        for (int64_t j = lo; j < hi; ++j)
          std::memcpy(dst + j * ps, src + (j - lo) * c.sw * c.x_pixel, c.Cin * sizeof(float));
        std::fill(dst + hi * ps, dst + l.Wq * ps, 0.f);
      }
    }
  }
}

// Padded, phase-split copy of one image's Cin planes: P[c][a][b][i][j] = x[c, a + i*sh - ph,
// b + j*sw - pw], zero outside the plane. Phases no tap reads are left as they are.
void fill_padded(const float* __restrict x, float* __restrict P, const TapConv& c, const Layout& l) {
  if (c.x_pixel) {
    fill_padded_nhwc(x, P, c, l);
    return;
  }
  for (int64_t ch = 0; ch < c.Cin; ++ch) {
    const float* xc = x + ch * c.H * c.W;
    for (int64_t a = 0; a < c.sh; ++a) {
      if (!l.row_used[a]) continue;
      for (int64_t b = 0; b < c.sw; ++b) {
        if (!l.col_used[b]) continue;
        float* dst = P + ch * l.plane + (a * c.sw + b) * l.phase;
        // columns j whose input column b + j*sw - pw lies in [0, W)
        const int64_t off = b - c.pw;
        int64_t lo, hi;
        valid_range(off, c.sw, c.W, l.Wq, lo, hi);
        for (int64_t i = 0; i < l.Hq; ++i, dst += l.Wq) {
          const int64_t h = a + i * c.sh - c.ph;
          if (h < 0 || h >= c.H || lo == hi) {
            std::fill(dst, dst + l.Wq, 0.f);
            continue;
          }
          std::fill(dst, dst + lo, 0.f);
          const float* src = xc + h * c.W + lo * c.sw + off;
          if (c.sw == 1) {
            std::memcpy(dst + lo, src, (hi - lo) * sizeof(float));
          } else {
            for (int64_t j = lo; j < hi; ++j) dst[j] = src[(j - lo) * c.sw];
          }
          std::fill(dst + hi, dst + l.Wq, 0.f);
        }
      }
    }
  }
}

// Sums of at most about this many products run in one register chain; chains are then
// added up in memory (blocked summation: float32 error like a BLAS's, not that of one
// chain of thousands of terms).
constexpr int64_t kChain = 96;

// tile (MR, NR) (+)= sum over channels and taps of w (Cin, T, MR) x the NR-runs at xq + offs[t].
void micro_kernel(const float* __restrict xq, int64_t plane, int64_t Cin, const int64_t* __restrict offs, int64_t T,
                  const float* __restrict w, float* __restrict tile, bool accumulate) {
  Vec acc[MR][NV];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t v = 0; v < NV; ++v) acc[i][v] = Vec(0.f);
  for (int64_t ch = 0; ch < Cin; ++ch, xq += plane) {
    for (int64_t t = 0; t < T; ++t, w += MR) {
      const float* b = xq + offs[t];
      Vec in[NV];
      for (int64_t v = 0; v < NV; ++v) in[v] = Vec::loadu(b + v * kLanes);
#pragma GCC unroll 8
      for (int64_t i = 0; i < MR; ++i) {
        const Vec a(w[i]);
        for (int64_t v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(a, in[v], acc[i][v]);
      }
    }
  }
  for (int64_t i = 0; i < MR; ++i) {
    for (int64_t v = 0; v < NV; ++v) {
      float* dst = tile + i * NR + v * kLanes;
      (accumulate ? acc[i][v] + Vec::loadu(dst) : acc[i][v]).store(dst);
    }
  }
}

// One NR-block of output positions [q0, q0 + NR) for every output channel of one image.
void run_block(const float* P, const float* packed, float* y, const TapConv& c, const Layout& l, int64_t q0) {
  alignas(64) float tile[MR * NR];
  const int64_t T = c.R * c.S, k_blocks = (c.Kout + MR - 1) / MR;
  const int64_t qe = std::min(q0 + NR, l.Q);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const float* wk = packed + kb * c.Cin * T * MR;
    const int64_t chunk = std::max<int64_t>(1, kChain / T);  // channels per register chain
    for (int64_t c0 = 0; c0 < c.Cin; c0 += chunk) {
      micro_kernel(P + q0 + c0 * l.plane, l.plane, std::min(chunk, c.Cin - c0), l.offs.data(), T, wk + c0 * T * MR,
                   tile, c0 > 0);
    }
    const int64_t rows = std::min(MR, c.Kout - kb * MR);
    // the block's positions row by row; columns >= OW are dropped
    int64_t oh = q0 / l.Wq, ow = q0 - oh * l.Wq;
    for (int64_t q = q0; q < qe; ++oh, ow = 0) {
      const int64_t n = std::min(qe - q, l.Wq - ow), keep = std::max<int64_t>(std::min(n, c.OW - ow), 0);
      if (keep > 0) {
        for (int64_t i = 0; i < rows; ++i) {
          float* dst = y + (kb * MR + i) * c.y_plane + oh * c.y_row + ow * c.y_col;
          const float* src = tile + i * NR + (q - q0);
          if (c.y_col == 1) {
            std::memcpy(dst, src, keep * sizeof(float));
          } else {
            for (int64_t j = 0; j < keep; ++j) dst[j * c.y_col] = src[j];
          }
        }
      }
      q += n;
    }
  }
}

// The channel-lane variant: vectors over output channels instead of positions. A block
// holds MP output pixels (any MP: taken from the valid pixels in order, so a row's
// columns past OW and a last partial NR-block are never computed) by KV vectors of
// output channels; for each input channel and tap it loads KV weight vectors and
// broadcasts MP inputs. Chosen per layer where it wastes fewer lanes: the positions
// kernel computes OH * Wq rounded up to NR positions for OH * OW outputs (14x14 planes:
// 240 for 196), this one Kout rounded up to KL channels (ResNet's widths: none).
constexpr int64_t KV = kLanes == 16 ? 4 : 2;
constexpr int64_t KL = KV * kLanes;
constexpr int64_t MP = kLanes == 16 ? 6 : 4;  // 24 accumulators, KV weights and a broadcast of 32 zmm
// Products per register chain, as the positions kernel: 192 ran 3% faster but summed
// 270-term outputs less accurately than torch's float32 conv (test_cpp_direct_taps).
constexpr int64_t kLaneChain = kChain;
constexpr int64_t kLaneSuper = 32;  // pixel blocks per task, over which a chain's weights are reused

// tile (MP, KL) (+)= sum over j < n of the inputs at xs[i] + offs[j] times w (n, KL): j
// runs over (channel, tap) pairs, offs[j] = channel * plane + the tap's offset (one flat
// loop: nested channel and tap loops made GCC spill the accumulators once per channel).
void lane_kernel(const float* const* xs, const int64_t* __restrict offs, int64_t n, const float* __restrict w,
                 float* __restrict tile, bool accumulate) {
  Vec acc[MP][KV];
  for (int64_t i = 0; i < MP; ++i)
    for (int64_t v = 0; v < KV; ++v) acc[i][v] = Vec(0.f);
  const float* x[MP];
  for (int64_t i = 0; i < MP; ++i) x[i] = xs[i];
  for (int64_t j = 0; j < n; ++j, w += KL) {
    const int64_t o = offs[j];
    Vec wv[KV];
    for (int64_t v = 0; v < KV; ++v) wv[v] = Vec::loadu(w + v * kLanes);
#pragma GCC unroll 8
    for (int64_t i = 0; i < MP; ++i) {
      const Vec b(x[i][o]);
      for (int64_t v = 0; v < KV; ++v) acc[i][v] = at::vec::fmadd(b, wv[v], acc[i][v]);
    }
  }
  for (int64_t i = 0; i < MP; ++i) {
    for (int64_t v = 0; v < KV; ++v) {
      float* dst = tile + i * KL + v * kLanes;
      (accumulate ? acc[i][v] + Vec::loadu(dst) : acc[i][v]).store(dst);
    }
  }
}

// Output channels [kb * KL, +KL) of pixel blocks [pb0, pb1) of one image: sums in `tile`
// (kLaneSuper * MP * KL floats), then written to y. qpad[p]: valid pixel p's position in
// the padded positions.
void run_lane_blocks(const float* P, const float* packed, float* y, const TapConv& c, const Layout& l,
                     const int64_t* qpad, int64_t kb, int64_t pb0, int64_t pb1, float* tile) {
  const int64_t T = c.R * c.S, pixels = c.OH * c.OW;
  const float* wk = packed + kb * c.Cin * T * KL;
  const int64_t chunk = std::max<int64_t>(1, kLaneChain / T);  // channels per register chain
  std::vector<int64_t> offs(chunk * T);  // (channel, tap) offsets of one chain
  for (int64_t ch = 0; ch < chunk; ++ch)
    for (int64_t t = 0; t < T; ++t) offs[ch * T + t] = ch * l.cs + l.offs[t] * l.ps;
  for (int64_t c0 = 0; c0 < c.Cin; c0 += chunk) {
    const int64_t nc = std::min(chunk, c.Cin - c0);
    for (int64_t pb = pb0; pb < pb1; ++pb) {
      const float* xs[MP];
      for (int64_t i = 0; i < MP; ++i)  // a last partial block repeats its last pixel
        xs[i] = P + c0 * l.cs + qpad[std::min(pb * MP + i, pixels - 1)] * l.ps;
      lane_kernel(xs, offs.data(), nc * T, wk + c0 * T * KL, tile + (pb - pb0) * MP * KL, c0 > 0);
    }
  }
  const int64_t p0 = pb0 * MP, p1 = std::min(pb1 * MP, pixels), kn = std::min(KL, c.Kout - kb * KL);
  if (c.y_plane == 1) {  // channels_last output: each pixel's channels as one run
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t oh = p / c.OW, ow = p - oh * c.OW;
      std::memcpy(y + kb * KL + oh * c.y_row + ow * c.y_col, tile + (p - p0) * KL, kn * sizeof(float));
    }
    return;
  }
  for (int64_t k = 0; k < kn; ++k) {
    float* yk = y + (kb * KL + k) * c.y_plane;
    const float* src = tile + k;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t oh = p / c.OW, ow = p - oh * c.OW;
      yk[oh * c.y_row + ow * c.y_col] = src[(p - p0) * KL];
    }
  }
}

// Share of computed lanes that are outputs, for each kernel.
double positions_efficiency(const TapConv& c) {
  const int64_t Wq = c.OW + ((c.S - 1) * c.dw) / c.sw, blocks = (c.OH * Wq + NR - 1) / NR;
  const int64_t kpad = (c.Kout + MR - 1) / MR * MR;
  return static_cast<double>(c.OH * c.OW) / (blocks * NR) * c.Kout / kpad;
}

double lanes_efficiency(const TapConv& c) {
  const int64_t pixels = c.OH * c.OW, kpad = (c.Kout + KL - 1) / KL * KL;
  return static_cast<double>(pixels) / ((pixels + MP - 1) / MP * MP) * c.Kout / kpad;
}

// Weight gradient as a sum of outer products over output pixels: for each valid pixel,
// dT (pixel, Kpad), dy transposed with its channels zero-padded to whole vectors, times
// the input each tap j = (channel, tap) reads there. A block of WKV vectors of output
// channels by WJ taps sits in registers for the whole sum (no horizontal reductions);
// only valid pixels enter, so the dropped columns never meet a gradient.
constexpr int64_t WKV = 2;
constexpr int64_t WJ = kLanes == 16 ? 12 : 5;
constexpr int64_t WKL = WKV * kLanes;

inline int64_t padded_channels(int64_t K) { return (K + WKL - 1) / WKL * WKL; }

// The sums' rows j: (channel, tap) pairs in dw's order, or for channels_last input (tap,
// channel), so that a block's WJ broadcasts at one pixel read neighbouring channels, one
// cache line, instead of WJ positions Cin floats apart.
inline int64_t grad_channel(const TapConv& c, int64_t j) { return c.x_pixel ? j % c.Cin : j / (c.R * c.S); }
inline int64_t grad_tap(const TapConv& c, int64_t j) { return c.x_pixel ? j / c.Cin : j % (c.R * c.S); }

// dT (OH*OW, Kpad), rows ld apart, = dy (K, OH*OW) transposed (channels_last dy: its
// rows, y_col apart), zeros past K.
void transpose_grad(const float* __restrict dy, float* __restrict dT, const TapConv& c, int64_t Kpad, int64_t ld,
                    int64_t pixels) {
  const int64_t K = c.Kout;
  for (int64_t q = 0; q < pixels; ++q) {
    float* row = dT + q * ld;
    if (c.y_plane == 1) {
      std::memcpy(row, dy + q * c.y_col, K * sizeof(float));
    } else {
      for (int64_t k = 0; k < K; ++k) row[k] = dy[k * pixels + q];
    }
    std::fill(row + K, row + Kpad, 0.f);
  }
}

// dwT (J, Kpad) rows [j0, j0 + WJ), columns [k0, k0 + WKL) += the block's sums for one image.
void weight_grad_block(const float* __restrict dT, int64_t ld, int64_t Kpad, const float* __restrict P,
                       const TapConv& c, const Layout& l, int64_t k0, int64_t j0, float* __restrict dwT) {
  const int64_t T = c.R * c.S, J = c.Cin * T, nj = std::min(WJ, J - j0);
  const float* xs[WJ];
  for (int64_t j = 0; j < WJ; ++j) {  // a tail block repeats its last tap
    const int64_t jj = std::min(j0 + j, J - 1);
    xs[j] = P + grad_channel(c, jj) * l.cs + l.offs[grad_tap(c, jj)] * l.ps;
  }
  const int64_t rows_per_chain = std::max<int64_t>(1, kChain / c.OW);
  for (int64_t oh0 = 0; oh0 < c.OH; oh0 += rows_per_chain) {
    Vec acc[WKV][WJ];
    for (int64_t v = 0; v < WKV; ++v)
      for (int64_t j = 0; j < WJ; ++j) acc[v][j] = Vec(0.f);
    for (int64_t oh = oh0; oh < std::min(c.OH, oh0 + rows_per_chain); ++oh) {
      const float* drow = dT + oh * c.OW * ld + k0;
      for (int64_t ow = 0, o = oh * l.Wq * l.ps; ow < c.OW; ++ow, drow += ld, o += l.ps) {
        Vec dv[WKV];
        for (int64_t v = 0; v < WKV; ++v) dv[v] = Vec::loadu(drow + v * kLanes);
#pragma GCC unroll 12
        for (int64_t j = 0; j < WJ; ++j) {
          const Vec xv(xs[j][o]);
          for (int64_t v = 0; v < WKV; ++v) acc[v][j] = at::vec::fmadd(dv[v], xv, acc[v][j]);
        }
      }
    }
    for (int64_t j = 0; j < nj; ++j) {
      float* dst = dwT + (j0 + j) * Kpad + k0;
      for (int64_t v = 0; v < WKV; ++v) (Vec::loadu(dst + v * kLanes) + acc[v][j]).store(dst + v * kLanes);
    }
  }
}

}  // namespace

bool tap_conv_suits(const TapConv& c) {
  if (!kHaveKernel) return false;
  // channels_last (the channel-lane kernel): planes under 64 output pixels run faster as
  // one GEMM over every image's patches (conv.cpp's batched_nhwc), as do outputs of less
  // than a vector of channels (the stem's 3-channel input gradient)
  if (c.x_pixel) return c.Kout >= kLanes && c.OH * c.OW >= 64;
  const int64_t extra = ((c.S - 1) * c.dw) / c.sw;
  // dropped columns at most a fifth of the row, enough output channels to fill MR rows,
  // and enough positions for whole blocks
  return c.OW >= 8 && extra * 4 <= c.OW && c.Kout >= MR && c.OH * c.OW >= 4 * NR;
}

// The channel-lane kernel runs below the positions kernel's rate per computed lane (one
// thread, 56x56x64 3x3: 88 against 107 GFLOP/s), so it takes a layer only where it saves
// more than that: 14x14 planes (0.99 against 0.82 of lanes used), not 28x28 (1.00 / 0.91).
constexpr double kLaneAdvantage = 1.15;

bool tap_conv_weight_grad_suits(const TapConv& c) {
  return tap_conv_suits(c) && (c.OH * c.OW >= 512 || c.Cin * c.Kout < 128 * 128);
}

bool tap_conv_lanes(const TapConv& c) {
  return c.x_pixel != 0 || lanes_efficiency(c) > kLaneAdvantage * positions_efficiency(c);
}

at::Tensor tap_conv_pack(const float* w, const TapConv& c, const std::vector<int64_t>& taps, int64_t w_taps,
                         bool transposed) {
  // (block, channel, tap, filter of the block): MR filters per block for the positions
  // kernel, KL for the channel-lane one
  const int64_t B = tap_conv_lanes(c) ? KL : MR;
  const int64_t T = c.R * c.S, k_blocks = (c.Kout + B - 1) / B;
  TORCH_CHECK(static_cast<int64_t>(taps.size()) == T, "tap_conv_pack: expected ", T, " taps");
  at::Tensor packed = at::empty({k_blocks * c.Cin * T * B}, at::TensorOptions().dtype(at::kFloat));
  float* p = packed.data_ptr<float>();
  // Filter by filter, over a few channels at a time: each filter's taps are read as a run
  // (w's rows), and the writes, B floats apart, stay in a block of kPackChannels * T * B
  // floats in L1. Walking the packed order instead (each channel's B filters, Cin * w_taps
  // floats apart) stalled on every load: 11% of a 14x14 layer's forward.
  constexpr int64_t kPackChannels = 8;
  const int64_t ch_stride = transposed ? c.Kout * w_taps : w_taps;  // a filter's next channel
  const int64_t k_stride = transposed ? w_taps : c.Cin * w_taps;    // a channel's next filter
  at::parallel_for(0, k_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t kb = b0; kb < b1; ++kb) {
      const int64_t rows = std::min(B, c.Kout - kb * B);  // a tail block's missing filters are zeros
      for (int64_t c0 = 0; c0 < c.Cin; c0 += kPackChannels) {
        const int64_t nc = std::min(kPackChannels, c.Cin - c0);
        float* dst = p + (kb * c.Cin + c0) * T * B;
        for (int64_t i = 0; i < B; ++i) {
          if (i >= rows) {
            for (int64_t j = 0; j < nc * T; ++j) dst[j * B + i] = 0.f;
            continue;
          }
          const float* src = w + (kb * B + i) * k_stride + c0 * ch_stride;
          for (int64_t ch = 0; ch < nc; ++ch)
            for (int64_t t = 0; t < T; ++t) dst[(ch * T + t) * B + i] = src[ch * ch_stride + taps[t]];
        }
      }
    }
  });
  return packed;
}

namespace {

// The channel-lane kernel over every image: tasks (channel block, run of kLaneSuper pixel
// blocks); images over threads when there are enough of them, else each image's tasks.
void run_lanes(const float* x, const float* pw, float* y, const TapConv& c, const Layout& l) {
  const int64_t pixels = c.OH * c.OW, pblocks = (pixels + MP - 1) / MP;
  const int64_t supers = (pblocks + kLaneSuper - 1) / kLaneSuper, k_blocks = (c.Kout + KL - 1) / KL;
  const int64_t tasks = k_blocks * supers;
  std::vector<int64_t> qpad(pixels);
  for (int64_t p = 0; p < pixels; ++p) qpad[p] = p / c.OW * l.Wq + p % c.OW;
  const auto task = [&](const float* P, float* yn, int64_t t, float* tile) {
    const int64_t kb = t / supers, sb = t % supers;
    run_lane_blocks(P, pw, yn, c, l, qpad.data(), kb, sb * kLaneSuper, std::min(pblocks, (sb + 1) * kLaneSuper), tile);
  };
  const int64_t threads = at::get_num_threads();
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const int64_t tile_floats = kLaneSuper * MP * KL;
  if (c.N >= threads && threads > 1) {
    at::Tensor scratch = at::zeros({threads, l.scratch + tile_floats}, opts);
    const at::ThreadLocalState state;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t th = t0; th < t1; ++th) {
        float* P = scratch.data_ptr<float>() + th * (l.scratch + tile_floats);
        float* tile = P + l.scratch;
        for (int64_t n = th; n < c.N; n += threads) {
          fill_padded(x + n * c.x_image, P, c, l);
          for (int64_t t = 0; t < tasks; ++t) task(P, y + n * c.y_image, t, tile);
        }
      }
    });
    return;
  }
  at::Tensor scratch = at::zeros({l.scratch}, opts);
  float* P = scratch.data_ptr<float>();
  for (int64_t n = 0; n < c.N; ++n) {
    fill_padded(x + n * c.x_image, P, c, l);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      thread_local std::vector<float> tile;
      tile.resize(tile_floats);
      for (int64_t t = t0; t < t1; ++t) task(P, y + n * c.y_image, t, tile.data());
    });
  }
}

}  // namespace

void tap_conv_run(const float* x, const at::Tensor& packed, float* y, const TapConv& c) {
  const Layout l = layout_of(c);
  const float* pw = packed.data_ptr<float>();
  if (tap_conv_lanes(c)) {
    run_lanes(x, pw, y, c, l);
    return;
  }
  const int64_t threads = at::get_num_threads();
  if (c.N >= threads && threads > 1) {
    // images over threads, each with its own padded copy
    at::Tensor scratch = at::zeros({threads, l.scratch}, packed.options());
    const at::ThreadLocalState state;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t t = t0; t < t1; ++t) {
        float* P = scratch.data_ptr<float>() + t * l.scratch;
        for (int64_t n = t; n < c.N; n += threads) {
          fill_padded(x + n * c.x_image, P, c, l);
          for (int64_t q0 = 0; q0 < l.Q; q0 += NR) run_block(P, pw, y + n * c.y_image, c, l, q0);
        }
      }
    });
  } else {
    at::Tensor scratch = at::zeros({l.scratch}, packed.options());
    float* P = scratch.data_ptr<float>();
    for (int64_t n = 0; n < c.N; ++n) {
      fill_padded(x + n * c.x_image, P, c, l);
      at::parallel_for(0, l.blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) run_block(P, pw, y + n * c.y_image, c, l, b * NR);
      });
    }
  }
}


void tap_conv_weight_grad(const float* x, const float* dy, float* dw, const TapConv& c) {
  const Layout l = layout_of(c);
  const int64_t T = c.R * c.S, J = c.Cin * T, Kpad = padded_channels(c.Kout), pixels = c.OH * c.OW;
  const int64_t k_blocks = Kpad / WKL, j_blocks = (J + WJ - 1) / WJ, ld = row_stride(Kpad);
  const int64_t threads = at::get_num_threads();
  // Images over threads need a (J, Kpad) partial sum per thread, zeroed and added up at the
  // end: worth it when each thread's images hold enough pixels to amortise that, else the
  // threads split the (channel, tap) blocks of each image (deep layers: 14x14 planes, few images).
  const int64_t slots = (c.N >= threads && threads > 1 && c.N / threads * pixels >= 512) ? threads : 1;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor scratch = at::zeros({slots, l.scratch}, opts);
  at::Tensor grads = at::empty({slots, pixels * ld}, opts);
  at::Tensor partial = at::zeros({slots, J * Kpad}, opts);  // (J, Kpad) per slot
  if (slots > 1) {
    // images over threads into per-thread partial sums, added up in a fixed order
    const at::ThreadLocalState state;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t t = t0; t < t1; ++t) {
        float* P = scratch.data_ptr<float>() + t * l.scratch;
        float* dT = grads.data_ptr<float>() + t * pixels * ld;
        float* acc = partial.data_ptr<float>() + t * J * Kpad;
        for (int64_t n = t; n < c.N; n += threads) {
          fill_padded(x + n * c.x_image, P, c, l);
          transpose_grad(dy + n * c.y_image, dT, c, Kpad, ld, pixels);
          for (int64_t jb = 0; jb < j_blocks; ++jb)
            for (int64_t kb = 0; kb < k_blocks; ++kb) weight_grad_block(dT, ld, Kpad, P, c, l, kb * WKL, jb * WJ, acc);
        }
      }
    });
  } else {
    float* P = scratch.data_ptr<float>();
    float* dT = grads.data_ptr<float>();
    float* acc = partial.data_ptr<float>();
    for (int64_t n = 0; n < c.N; ++n) {  // images in order, each block's sum by one task
      fill_padded(x + n * c.x_image, P, c, l);
      transpose_grad(dy + n * c.y_image, dT, c, Kpad, ld, pixels);
      at::parallel_for(0, k_blocks * j_blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          weight_grad_block(dT, ld, Kpad, P, c, l, (b % k_blocks) * WKL, (b / k_blocks) * WJ, acc);
      });
    }
  }
  // dw (Kout, J) = the slots' (J, Kpad) sums, transposed, slot 0 first: by 16 x 16 tiles
  // (rows of the sums read and rows of dw written as runs; a column walk of the sums, Kpad
  // floats apart, cost a quarter of the whole weight gradient)
  constexpr int64_t kT = 16;
  const float* p = partial.data_ptr<float>();
  at::parallel_for(0, (J + kT - 1) / kT, 1, [&](int64_t b0, int64_t b1) {
    float tile[kT][kT];
    for (int64_t j0 = b0 * kT; j0 < std::min(J, b1 * kT); j0 += kT) {
      const int64_t nj = std::min(kT, J - j0);
      for (int64_t k0 = 0; k0 < c.Kout; k0 += kT) {
        const int64_t nk = std::min(kT, c.Kout - k0);
        for (int64_t jj = 0; jj < nj; ++jj) {
          const int64_t ch = (j0 + jj) / T, tap = (j0 + jj) % T;  // dw's column j0 + jj
          const float* row = p + (c.x_pixel ? tap * c.Cin + ch : j0 + jj) * Kpad + k0;
          for (int64_t kk = 0; kk < nk; ++kk) {
            float sum = row[kk];
            for (int64_t t = 1; t < slots; ++t) sum += row[t * J * Kpad + kk];
            tile[kk][jj] = sum;
          }
        }
        for (int64_t kk = 0; kk < nk; ++kk) std::memcpy(dw + (k0 + kk) * J + j0, tile[kk], nj * sizeof(float));
      }
    }
  });
}

}  // namespace pyops
