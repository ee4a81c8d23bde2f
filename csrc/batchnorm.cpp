// Batch normalisation on CPU: per-channel statistics, normalisation and both gradients.
//
// Every entry takes 3-D views (N, C, L) of the input (L = the product of the spatial
// sizes) stored densely either channel-major (NCL, what NCHW gives) or channel-minor
// (NLC, what channels_last gives). The Python launcher makes that view.
//
// Statistics are (count, mean, biased variance) per channel, combined with Chan et
// al.'s pairwise update: each task sums a tile of at most kTile elements per channel
// in the compute type (two passes over the tile, which is in cache: its mean, summed as
// deviations from a pivot value of the task, then the squared deviations from that mean)
// and merges the tile into its running moments in double. So an input with mean 1e4 and
// std 1 in float32 keeps its variance; the one-pass E[x^2] - E[x]^2 would not. The tasks' partial moments come back as a
// (P, 3, C) tensor and are merged by batch_norm_merge_stats, which also combines the
// partials of several processes (SyncBatchNorm).
//
// Normalisation and the input gradient are one per-channel affine map,
//   out = p[c] * (u - mu[c]) + q[c] * (v - mv[c]) + r[c],
// with coefficients for each case built once per channel (channel_affine below).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "autograd.h"
#include "common.h"

namespace pyops {

namespace {

constexpr int64_t kTile = 4096;       // elements per channel summed before a merge in double
constexpr int64_t kMinTileRows = 16;    // channel-minor tiles: enough rows per merge in double
// Channel-minor reductions sum tiles of about this many elements (kMinTileRows to kTile
// rows) before adding each channel's sums up in double: a 4096-element tile of 256
// channels was 16 rows, and its per-channel double work a large part of the pass
// (2x256x56x56 gradient sums: one thread 0.35-0.42 -> 0.28-0.34 ms, two 0.13-0.16 ->
// 0.11-0.14). A tile (256 KiB of float) stays in L2 for the statistics' second pass;
// 16384 elements gave 2048 channels tiles of 16 rows (statistics of 2x1024x14x14 cut by
// rows: 44 -> 32 us at 65536).
constexpr int64_t kRowTile = 65536;
constexpr int64_t kMinTaskWork = 32768;  // elements per task, so small inputs do not pay for threads
constexpr int64_t kSmallPlane = 64;      // NCL planes smaller than this reduce across images (see SmallPlanes)
constexpr int64_t kBlockElems = 1024;    // elements per image of one SmallPlanes channel block

struct View {
  int64_t N, C, L;
  bool nlc;
};

View view_of(const at::Tensor& x, bool channels_last, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, name, " must be a 3-D (N, C, L) view, got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be floating point, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  if (channels_last) {
    TORCH_CHECK((N <= 1 || x.stride(0) == L * C) && (C <= 1 || x.stride(1) == 1) && (L <= 1 || x.stride(2) == C),
                name, " must be dense channel-minor (N, L, C) storage");
  } else {
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous (N, C, L) storage");
  }
  // L == 1: (N, C, 1) is stored channel-minor too, and its rows of C channels take the
  // vectorised NLC paths, where NCL would make N * C rows of one element
  return {N, C, L, channels_last || L == 1};
}

void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(same_layout(a, b) && a.scalar_type() == b.scalar_type(), an, " and ", bn,
              " must have the same shape, strides and dtype");
}

// A per-channel vector of C values as doubles (running stats, weights, stats rows).
std::vector<double> channel_values(const c10::optional<at::Tensor>& t, int64_t C, double fill, const char* name) {
  std::vector<double> out(C, fill);
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK(t->device().is_cpu() && t->numel() == C, name, " must be a CPU tensor of ", C, " elements, got ",
              t->numel());
  // read in place (no converted copy: small layers call this several times per step)
  const at::Tensor flat = t->dim() == 1 ? *t : t->reshape({C});
  const int64_t stride = flat.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "batch_norm_channel_values", [&] {
    const scalar_t* p = flat.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<double>(p[c * stride]);
  });
  return out;
}

struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double total = n + nb, delta = mean_b - mean, f = nb / total;
    mean += delta * f;
    m2 += m2_b + delta * delta * n * f;
    n = total;
  }
};

// Moments::merge over C channels held as arrays (count, mean, M2), branch-free so it
// vectorises (one division per 8 channels, not two per channel: merging thousands of
// channels was a third of a small layer's forward). nb(c) is the merged part's count (a
// zero count merges nothing), m2_b its M2 in double or the compute type.
template <typename Count, typename m2_t>
inline void merge_channels(double* __restrict n, double* __restrict mean, double* __restrict m2, const Count& nb,
                           const double* __restrict mean_b, const m2_t* __restrict m2_b, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const double count = nb(c), total = n[c] + count, delta = mean_b[c] - mean[c];
    const double f = total > 0 ? count / total : 0.0;
    mean[c] += delta * f;
    m2[c] += static_cast<double>(m2_b[c]) + delta * delta * n[c] * f;
    n[c] = total;
  }
}

// Partial p of channel c in a (P, 3, C) tensor of (count, mean, biased variance) rows.
inline void store_moments(double* out, int64_t p, int64_t C, int64_t c, const Moments& m) {
  out[(p * 3 + 0) * C + c] = m.n;
  out[(p * 3 + 1) * C + c] = m.mean;
  out[(p * 3 + 2) * C + c] = m.n > 0 ? m.m2 / m.n : 0.0;
}

// Row reductions. `omp simd reduction` lets the compiler keep vector partial sums (a
// fixed order for a given build, so results are reproducible); plain loops, or lane
// arrays with two accumulators, stayed scalar under GCC (4-10x slower).
// sum (p[i] - pivot): with a pivot near the data (the task's first value) the summands are
// O(std), so the float sum keeps the tile mean exact to float precision of the std, not of
// the mean (x ~ 1e4: a plain float sum of 4096 values would be off by ~0.04).
template <typename scalar_t, typename opmath_t>
inline opmath_t row_sum(const scalar_t* __restrict p, int64_t n, opmath_t pivot) {
  opmath_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<opmath_t>(p[i]) - pivot;
  return s;
}

template <typename scalar_t, typename opmath_t>
inline opmath_t row_sq_dev(const scalar_t* __restrict p, int64_t n, opmath_t m) {
  opmath_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t d = static_cast<opmath_t>(p[i]) - m;
    s += d * d;
  }
  return s;
}

template <typename opmath_t>
struct GradSums {
  opmath_t dy, dyx;
};

// (sum dy, sum dy * (x - m)) over one row.
template <typename scalar_t, typename opmath_t>
inline GradSums<opmath_t> row_grad_sums(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t n,
                                        opmath_t m) {
  opmath_t s_dy = 0, s_dyx = 0;
#pragma omp simd reduction(+ : s_dy, s_dyx)
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t g = static_cast<opmath_t>(dy[i]);
    s_dy += g;
    s_dyx += g * (static_cast<opmath_t>(x[i]) - m);
  }
  return {s_dy, s_dyx};
}

// How a reduction over (N, L) per channel is cut into tasks. NCL: task (c, chunk of
// images); NLC: task (group of channels, chunk of the N*L rows). Either way `splits` is the
// number of partial results per channel, in a fixed order (deterministic sums).
struct Split {
  int64_t splits, per;        // partials per channel; images (NCL) or rows (NLC) per partial
  int64_t groups = 1, width;  // NLC: groups of `width` channels (the last may be narrower)

  int64_t group_begin(int64_t g) const { return g * width; }
  int64_t group_width(int64_t g, int64_t C) const { return std::min(width, C - g * width); }
};

// NLC inputs whose tensors read by the reduction (`bytes` per element of the input, all
// of them) take at most kGroupBytes are cut by channels first: each task then sums whole
// columns of rows for its channels, one partial per channel and long tiles (a cut by rows
// gave 2x2048x7x7 (98 rows) four partials, each of tiles of 16 rows, the per-channel
// double work more than the adds: statistics 32 -> 19 us, gradient sums 31 -> 23). Above
// that, rows: a thread's columns of a power-of-two row stride use only a part of the
// cache's sets, so they fell out of L2 where rows stayed (8x256x14x14 gradient sums 22 ->
// 55 us). Groups are whole multiples of kGroupAlign channels, whole vector blocks.
constexpr int64_t kGroupBytes = 2 * 1024 * 1024;
constexpr int64_t kGroupAlign = 64;

Split split_of(const View& v, int64_t bytes) {
  const int64_t threads = at::get_num_threads();
  if (!v.nlc) {
    const int64_t want = std::max<int64_t>(1, (2 * threads + v.C - 1) / std::max<int64_t>(v.C, 1));
    const int64_t by_work = std::max<int64_t>(1, v.N * v.L / kMinTaskWork);
    const int64_t splits = std::max<int64_t>(1, std::min({want, by_work, v.N}));
    const int64_t per = std::max<int64_t>(1, (v.N + splits - 1) / splits);
    return {std::max<int64_t>(1, (v.N + per - 1) / per), per, 1, v.C};
  }
  const int64_t rows = v.N * v.L;
  const int64_t tasks = std::max<int64_t>(1, std::min(2 * threads, rows * v.C / kMinTaskWork));
  int64_t width = std::max<int64_t>(v.C, 1);
  if (rows * v.C * bytes <= kGroupBytes && tasks > 1) {
    const int64_t groups = std::min(tasks, v.C / kGroupAlign);
    if (groups > 1) width = std::max(kGroupAlign, v.C / groups / kGroupAlign * kGroupAlign);  // groups or more
  }
  const int64_t groups = (v.C + width - 1) / width;
  const int64_t splits = std::max<int64_t>(1, std::min((tasks + groups - 1) / groups, rows));
  const int64_t per = std::max<int64_t>(1, (rows + splits - 1) / splits);
  return {std::max<int64_t>(1, (rows + per - 1) / per), per, groups, width};
}

// Run f over the tasks of a reduction in parallel: NCL f(c, split, n0, n1),
// NLC f(group, split, r0, r1).
template <typename F>
void for_each_task(const View& v, const Split& s, const F& f) {
  if (!v.nlc) {
    at::parallel_for(0, v.C * s.splits, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t c = t / s.splits, k = t % s.splits;
        f(c, k, k * s.per, std::min(v.N, (k + 1) * s.per));
      }
    });
  } else {
    const int64_t rows = v.N * v.L;
    at::parallel_for(0, s.groups * s.splits, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t g = t / s.splits, k = t % s.splits;
        f(g, k, k * s.per, std::min(rows, (k + 1) * s.per));
      }
    });
  }
}

// Channel-minor (NLC) blocks: kBlockVecs vectors of consecutive channels whose per-channel
// values (means, coefficients, accumulators) stay in registers while the rows stream
// past, instead of being loaded and stored per row from C-long arrays (a 64-channel
// layer spent its time on those; 2048 channels' coefficient arrays did not fit in L1).
// Only for float and double (scalar_t == opmath_t); the last block may be partial (masked).
constexpr int kBlockVecs = 4;
// Rows per reload of a block's coefficients: a tile of about kAffineTile elements per
// tensor, so that the blocks' passes over it stay in L1 (32 rows of 256 channels did not).
constexpr int64_t kAffineTile = 2048;

template <typename T>
using VecT = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t block_width() {
  return kBlockVecs * VecT<T>::size();
}

// Vector j of a block of w channels at p: FULL blocks load whole vectors; a partial one
// loads its first w lanes (zeros after them).
template <typename T, bool FULL>
inline VecT<T> load_block(const T* p, int64_t w, int j) {
  constexpr int64_t S = VecT<T>::size();
  if constexpr (FULL) {
    return VecT<T>::loadu(p + j * S);
  } else {
    const int64_t n = w - j * S;
    if (n >= S) return VecT<T>::loadu(p + j * S);
    return n > 0 ? VecT<T>::loadu(p + j * S, n) : VecT<T>(T(0));
  }
}

template <typename T, bool FULL>
inline void store_block(const VecT<T>& v, T* p, int64_t w, int j) {
  constexpr int64_t S = VecT<T>::size();
  if constexpr (FULL) {
    v.store(p + j * S);
  } else {
    const int64_t n = w - j * S;
    if (n >= S) {
      v.store(p + j * S);
    } else if (n > 0) {
      v.store(p + j * S, n);
    }
  }
}

// f(full, c0, w) for each block of channels [c0, c0 + w) of C; `full` is std::true_type
// for whole blocks, std::false_type for the partial last one (C++17: no template lambdas).
template <typename T, typename F>
inline void for_each_block(int64_t C, const F& f) {
  constexpr int64_t W = block_width<T>();
  int64_t c0 = 0;
  for (; c0 + W <= C; c0 += W) f(std::true_type{}, c0, W);
  if (c0 < C) f(std::false_type{}, c0, C - c0);
}

// Over `rows` rows of C channels from x (row stride C), block [c0, c0 + w):
// out[c] = sum (x - pivot[c]) (SQUARE: sum (x - pivot[c])^2), for c in the block.
template <typename T, bool FULL, bool SQUARE>
inline void block_dev_sum(const T* x, int64_t C, int64_t rows, int64_t c0, int64_t w, const T* pivot, T* out) {
  VecT<T> acc[kBlockVecs], piv[kBlockVecs];
  for (int j = 0; j < kBlockVecs; ++j) {
    acc[j] = VecT<T>(T(0));
    piv[j] = load_block<T, FULL>(pivot + c0, w, j);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = x + i * C + c0;
    for (int j = 0; j < kBlockVecs; ++j) {
      const VecT<T> d = load_block<T, FULL>(row, w, j) - piv[j];
      acc[j] = SQUARE ? at::vec::fmadd(d, d, acc[j]) : acc[j] + d;
    }
  }
  for (int j = 0; j < kBlockVecs; ++j) store_block<T, FULL>(acc[j], out + c0, w, j);
}

// Over `rows` rows, block [c0, c0 + w): sdy[c] = sum dy, sdyx[c] = sum dy (x - mean[c]).
template <typename T, bool FULL>
inline void block_grad_sums(const T* dy, const T* x, int64_t C, int64_t rows, int64_t c0, int64_t w,
                            const T* mean, T* sdy, T* sdyx) {
  VecT<T> a[kBlockVecs], b[kBlockVecs], m[kBlockVecs];
  for (int j = 0; j < kBlockVecs; ++j) {
    a[j] = VecT<T>(T(0));
    b[j] = VecT<T>(T(0));
    m[j] = load_block<T, FULL>(mean + c0, w, j);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* g = dy + i * C + c0;
    const T* xx = x + i * C + c0;
    for (int j = 0; j < kBlockVecs; ++j) {
      const VecT<T> gv = load_block<T, FULL>(g, w, j);
      a[j] = a[j] + gv;
      b[j] = at::vec::fmadd(gv, load_block<T, FULL>(xx, w, j) - m[j], b[j]);
    }
  }
  for (int j = 0; j < kBlockVecs; ++j) {
    store_block<T, FULL>(a[j], sdy + c0, w, j);
    store_block<T, FULL>(b[j], sdyx + c0, w, j);
  }
}

// Small planes (NCL, L < kSmallPlane): a row of L elements is too short for a vector
// reduction (its horizontal sum costs more than the adds). A block of channels is one
// contiguous run of cb * L elements in every image, so it is reduced across images
// element by element into cb * L accumulators (plain vector adds), and each channel's L
// accumulators are summed once per tile of images. Tasks: channel blocks x image splits.
struct SmallPlanes {
  int64_t cb, blocks, grain;  // channels per block, blocks, tasks per thread at least

  SmallPlanes(const View& v, const Split& s) {
    cb = std::max<int64_t>(1, std::min(v.C, kBlockElems / std::max<int64_t>(v.L, 1)));
    blocks = (v.C + cb - 1) / cb;
    grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, cb * v.L * s.per));
  }

  // f(c0, channels, k, n0, n1) for every task, in parallel
  template <typename F>
  void for_each(const View& v, const Split& s, const F& f) const {
    at::parallel_for(0, blocks * s.splits, grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t c0 = (t / s.splits) * cb, k = t % s.splits;
        f(c0, std::min(cb, v.C - c0), k, k * s.per, std::min(v.N, (k + 1) * s.per));
      }
    });
  }

  static int64_t tile_images(const View& v) { return std::max<int64_t>(1, kTile / std::max<int64_t>(v.L, 1)); }
};

// A per-thread scratch buffer of at least n values (reused, not zeroed): the small-plane
// tasks are many and short, so allocating and zero-filling their accumulators per task cost
// more than their arithmetic.
template <typename T>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Each channel's value repeated over its L accumulators: out[c * L + l] = v[c].
template <typename opmath_t, typename value_t>
inline void spread_planes(const value_t* v, int64_t channels, int64_t L, opmath_t* out) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t l = 0; l < L; ++l) out[c * L + l] = static_cast<opmath_t>(v[c]);
}

// Sum of each channel's L accumulators: out[c] = sum acc[c * L, (c + 1) * L), as vector adds
// (a masked load for the tail) and one shuffle reduction per channel. A scalar add chain per
// channel (or GCC's reduction of an `omp simd` loop, 16 dependent adds) made this horizontal
// sum a large part of the work for few images. With the scratch buffers (no per-task
// allocation and zero-fill), one thread, 2 x 2048 x 7 x 7: gradient sums 138 -> 63 us,
// statistics 139 -> 67 us.
template <typename opmath_t>
inline void sum_planes(const opmath_t* acc, int64_t channels, int64_t L, opmath_t* out) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  for (int64_t c = 0; c < channels; ++c) {
    const opmath_t* p = acc + c * L;
    if (L < kW) {  // tiny planes: a few scalar adds
      opmath_t t = 0;
      for (int64_t l = 0; l < L; ++l) t += p[l];
      out[c] = t;
      continue;
    }
    Vec s = Vec::loadu(p);
    int64_t l = kW;
    for (; l + kW <= L; l += kW) s += Vec::loadu(p + l);
    if (l < L) s += Vec::loadu(p + l, L - l);
    out[c] = at::vec::vec_reduce_all<opmath_t>([](Vec& a, Vec& b) { return a + b; }, s);
  }
}

template <typename scalar_t>
void partial_stats_small(const at::Tensor& x, const View& v, const Split& s, at::Tensor& partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  double* out = partials.mutable_data_ptr<double>();  // (splits, 3, C)
  const int64_t C = v.C, L = v.L, tile = SmallPlanes::tile_images(v);
  const SmallPlanes sp(v, s);
  sp.for_each(v, s, [&](int64_t c0, int64_t nc, int64_t k, int64_t n0, int64_t n1) {
    if (n0 >= n1) {
      for (int64_t c = 0; c < nc; ++c) store_moments(out, k, C, c0 + c, Moments{});
      return;
    }
    const int64_t B = nc * L;
    opmath_t* __restrict a = scratch<opmath_t>(2 * B + nc);  // accumulators, reference values, sums
    opmath_t* __restrict r = a + B;
    opmath_t* sums = a + 2 * B;
    std::vector<double> piv(nc), tm(nc);
    std::vector<Moments> m(nc);
    for (int64_t c = 0; c < nc; ++c) piv[c] = static_cast<double>(px[(n0 * C + c0 + c) * L]);
    for (int64_t n = n0; n < n1; n += tile) {
      const int64_t rows = std::min(tile, n1 - n);
      const double count = static_cast<double>(rows * L);
      // pass 1: tile means, summed as deviations from the pivot (the first row initialises)
      spread_planes(piv.data(), nc, L, r);
      for (int64_t i = n; i < n + rows; ++i) {
        const scalar_t* __restrict p = px + (i * C + c0) * L;
        if (i == n) {
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) a[j] = static_cast<opmath_t>(p[j]) - r[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) a[j] += static_cast<opmath_t>(p[j]) - r[j];
        }
      }
      sum_planes(a, nc, L, sums);
      for (int64_t c = 0; c < nc; ++c) tm[c] = piv[c] + static_cast<double>(sums[c]) / count;
      // pass 2: squared deviations from the tile means
      spread_planes(tm.data(), nc, L, r);
      for (int64_t i = n; i < n + rows; ++i) {
        const scalar_t* __restrict p = px + (i * C + c0) * L;
        if (i == n) {
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) {
            const opmath_t d = static_cast<opmath_t>(p[j]) - r[j];
            a[j] = d * d;
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) {
            const opmath_t d = static_cast<opmath_t>(p[j]) - r[j];
            a[j] += d * d;
          }
        }
      }
      sum_planes(a, nc, L, sums);
      for (int64_t c = 0; c < nc; ++c) m[c].merge(count, tm[c], static_cast<double>(sums[c]));
    }
    for (int64_t c = 0; c < nc; ++c) store_moments(out, k, C, c0 + c, m[c]);
  });
}

template <typename scalar_t>
void grad_sums_small(const at::Tensor& dy, const at::Tensor& x, const View& v, const Split& s,
                     const std::vector<double>& mean, at::Tensor& partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  double* out = partials.mutable_data_ptr<double>();  // (splits, 2, C)
  const int64_t C = v.C, L = v.L, tile = SmallPlanes::tile_images(v);
  const SmallPlanes sp(v, s);
  sp.for_each(v, s, [&](int64_t c0, int64_t nc, int64_t k, int64_t n0, int64_t n1) {
    const int64_t B = nc * L;
    opmath_t* __restrict a = scratch<opmath_t>(3 * B + nc);  // sum dy, sum dy (x - mean), mean, sums
    opmath_t* __restrict b = a + B;
    opmath_t* __restrict r = a + 2 * B;
    opmath_t* sums = a + 3 * B;
    std::vector<double> tot_dy(nc, 0.0), tot_dyx(nc, 0.0);
    spread_planes(mean.data() + c0, nc, L, r);
    for (int64_t n = n0; n < n1; n += tile) {
      const int64_t rows = std::min(tile, n1 - n);
      for (int64_t i = n; i < n + rows; ++i) {
        const int64_t off = (i * C + c0) * L;
        const scalar_t* __restrict g = pdy + off;
        const scalar_t* __restrict xx = px + off;
        if (i == n) {  // the first row initialises the accumulators
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) {
            const opmath_t gv = static_cast<opmath_t>(g[j]);
            a[j] = gv;
            b[j] = gv * (static_cast<opmath_t>(xx[j]) - r[j]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < B; ++j) {
            const opmath_t gv = static_cast<opmath_t>(g[j]);
            a[j] += gv;
            b[j] += gv * (static_cast<opmath_t>(xx[j]) - r[j]);
          }
        }
      }
      sum_planes(a, nc, L, sums);
      for (int64_t c = 0; c < nc; ++c) tot_dy[c] += static_cast<double>(sums[c]);
      sum_planes(b, nc, L, sums);
      for (int64_t c = 0; c < nc; ++c) tot_dyx[c] += static_cast<double>(sums[c]);
    }
    for (int64_t c = 0; c < nc; ++c) {
      out[(k * 2 + 0) * C + c0 + c] = tot_dy[c];
      out[(k * 2 + 1) * C + c0 + c] = tot_dyx[c];
    }
  });
}

// Small planes of few images per task (NCL, L < kSmallPlane, at most kRowImages images):
// each channel's rows summed in vector registers (a masked last vector), one horizontal sum
// per channel. SmallPlanes' per-element accumulators cost two stores per element and
// image, and its reference values a spread per task: for two images, more than the sums.
// float and double only (scalar_t == opmath_t).
constexpr int64_t kRowImages = 4;

// (sum dy, sum dy * (x - mean)) of channel c over images [n0, n1) of NCL planes of L elements.
// Not inlined, nor is channel_grad_sums_ncl: the separate reduction and the fused backward
// call the same compiled code, so their sums agree bit for bit (an `omp simd` reduction
// inlined into two loops may be vectorised differently in each; it was, once).
template <typename T>
__attribute__((noinline)) GradSums<double> channel_grad_sums_rows(const T* pdy, const T* px, int64_t C, int64_t L,
                                                                  int64_t c, int64_t n0, int64_t n1, T mean) {
  using V = VecT<T>;
  constexpr int64_t S = V::size();
  V a(T(0)), bb(T(0));
  const V m(mean);
  for (int64_t n = n0; n < n1; ++n) {
    const T* g = pdy + (n * C + c) * L;
    const T* xx = px + (n * C + c) * L;
    int64_t i = 0;
    for (; i + S <= L; i += S) {
      const V gv = V::loadu(g + i);
      a = a + gv;
      bb = at::vec::fmadd(gv, V::loadu(xx + i) - m, bb);
    }
    if (i < L) {  // lanes past L load as zeros: gv = 0 adds nothing
      const V gv = V::loadu(g + i, L - i);
      a = a + gv;
      bb = at::vec::fmadd(gv, V::loadu(xx + i, L - i) - m, bb);
    }
  }
  const auto add = [](V& p, V& q) { return p + q; };
  return {static_cast<double>(at::vec::vec_reduce_all<T>(add, a)),
          static_cast<double>(at::vec::vec_reduce_all<T>(add, bb))};
}

template <typename T>
void grad_sums_rows(const at::Tensor& dy, const at::Tensor& x, const View& v, const Split& s,
                    const std::vector<double>& mean, at::Tensor& partials) {
  const T* pdy = dy.const_data_ptr<T>();
  const T* px = x.const_data_ptr<T>();
  double* out = partials.mutable_data_ptr<double>();  // (splits, 2, C)
  const int64_t C = v.C, L = v.L;
  for_each_task(v, s, [&](int64_t c, int64_t k, int64_t b, int64_t e) {
    const GradSums<double> sums = channel_grad_sums_rows<T>(pdy, px, C, L, c, b, e, static_cast<T>(mean[c]));
    out[(k * 2 + 0) * C + c] = sums.dy;
    out[(k * 2 + 1) * C + c] = sums.dyx;
  });
}

template <typename scalar_t>
void partial_stats_impl(const at::Tensor& x, const View& v, const Split& s, at::Tensor& partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  double* out = partials.mutable_data_ptr<double>();  // (splits, 3, C)
  const int64_t C = v.C, L = v.L;
  for_each_task(v, s, [&](int64_t c, int64_t k, int64_t b, int64_t e) {
    if (!v.nlc) {
      Moments m;
      const opmath_t pivot = b < e && L > 0 ? static_cast<opmath_t>(px[(b * C + c) * L]) : opmath_t(0);
      for (int64_t n = b; n < e; ++n) {
        const scalar_t* row = px + (n * C + c) * L;
        for (int64_t i = 0; i < L; i += kTile) {
          const int64_t len = std::min(kTile, L - i);
          const double tm = static_cast<double>(pivot) +
                            static_cast<double>(row_sum<scalar_t, opmath_t>(row + i, len, pivot)) / len;
          m.merge(static_cast<double>(len), tm,
                  row_sq_dev<scalar_t, opmath_t>(row + i, len, static_cast<opmath_t>(tm)));
        }
      }
      store_moments(out, k, C, c, m);
      return;
    }
    // group c: channels [g0, g0 + cw), rows [b, e); tiles of rows x cw channels
    const int64_t g0 = s.group_begin(c), cw = s.group_width(c, C);
    std::vector<double> mn(cw, 0.0), mmean(cw, 0.0), mm2(cw, 0.0);
    std::vector<opmath_t> acc(cw), tm(cw), piv(cw, opmath_t(0));
    std::vector<double> tm_d(cw);
    if (b < e)
      for (int64_t ch = 0; ch < cw; ++ch) piv[ch] = static_cast<opmath_t>(px[b * C + g0 + ch]);
    const int64_t tile_rows = std::max<int64_t>(kMinTileRows, std::min(kTile, kRowTile / std::max<int64_t>(cw, 1)));
    for (int64_t r = b; r < e; r += tile_rows) {
      const int64_t rows = std::min(tile_rows, e - r);
      const scalar_t* tile = px + r * C + g0;
      opmath_t* __restrict a = acc.data();
      const opmath_t* __restrict pv = piv.data();
      const opmath_t* __restrict t = tm.data();
      // a[ch] = sum over the tile of (x - pivot[ch]), or of its square (`square`)
      const auto dev_sum = [&](auto square, const opmath_t* __restrict pivot) {
        constexpr bool SQUARE = decltype(square)::value;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          for_each_block<opmath_t>(cw, [&](auto full, int64_t c0, int64_t w) {
            block_dev_sum<opmath_t, decltype(full)::value, SQUARE>(tile, C, rows, c0, w, pivot, a);
          });
        } else {
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t ch = 0; ch < cw; ++ch) {
              const opmath_t d = static_cast<opmath_t>(tile[i * C + ch]) - pivot[ch];
              a[ch] += SQUARE ? d * d : d;
            }
        }
      };
      dev_sum(std::false_type{}, pv);
      for (int64_t ch = 0; ch < cw; ++ch) {
        tm_d[ch] = static_cast<double>(pv[ch]) + static_cast<double>(a[ch]) / rows;
        tm[ch] = static_cast<opmath_t>(tm_d[ch]);
      }
      dev_sum(std::true_type{}, t);
      const double tile_n = static_cast<double>(rows);
      merge_channels(mn.data(), mmean.data(), mm2.data(), [tile_n](int64_t) { return tile_n; }, tm_d.data(), a, cw);
    }
    for (int64_t ch = 0; ch < cw; ++ch) store_moments(out, k, C, g0 + ch, Moments{mn[ch], mmean[ch], mm2[ch]});
  });
}

// (sum dy, sum dy * (x - mean)) of channel c over images [n0, n1) of NCL planes of L
// elements: tiles of kTile summed in the compute type, added up in double.
template <typename scalar_t>
__attribute__((noinline)) GradSums<double> channel_grad_sums_ncl(const scalar_t* pdy, const scalar_t* px, int64_t C,
                                                                 int64_t L, int64_t c, int64_t n0, int64_t n1,
                                                                 double mean) {
  using opmath_t = at::opmath_type<scalar_t>;
  double s_dy = 0, s_dyx = 0;
  const opmath_t m = static_cast<opmath_t>(mean);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * C + c) * L;
    for (int64_t i = 0; i < L; i += kTile) {
      const auto sums = row_grad_sums<scalar_t, opmath_t>(pdy + off + i, px + off + i, std::min(kTile, L - i), m);
      s_dy += sums.dy;
      s_dyx += sums.dyx;
    }
  }
  return {s_dy, s_dyx};
}

// (sum dy, sum dy * (x - mean)) over rows [r0, r1) of NLC channels [g0, g0 + cw) into
// sdy[0, cw), sdyx[0, cw) (mean: the group's cw means): tiles of rows summed in the compute
// type, added up in double. Not inlined, as channel_grad_sums_rows.
template <typename scalar_t>
__attribute__((noinline)) void group_grad_sums(const scalar_t* pdy, const scalar_t* px, int64_t C, int64_t g0,
                                               int64_t cw, int64_t r0, int64_t r1, const double* mean, double* sdy,
                                               double* sdyx) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::fill_n(sdy, cw, 0.0);
  std::fill_n(sdyx, cw, 0.0);
  std::vector<opmath_t> a(cw), bb(cw), mm(cw);
  for (int64_t ch = 0; ch < cw; ++ch) mm[ch] = static_cast<opmath_t>(mean[ch]);
  const int64_t tile_rows = std::max<int64_t>(kMinTileRows, std::min(kTile, kRowTile / std::max<int64_t>(cw, 1)));
  for (int64_t r = r0; r < r1; r += tile_rows) {
    const int64_t rows = std::min(tile_rows, r1 - r);
    opmath_t* __restrict pa = a.data();
    opmath_t* __restrict pb = bb.data();
    const opmath_t* __restrict pm = mm.data();
    const scalar_t* tdy = pdy + r * C + g0;
    const scalar_t* tx = px + r * C + g0;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      for_each_block<opmath_t>(cw, [&](auto full, int64_t c0, int64_t w) {
        block_grad_sums<opmath_t, decltype(full)::value>(tdy, tx, C, rows, c0, w, pm, pa, pb);
      });
    } else {
      std::fill(a.begin(), a.end(), opmath_t(0));
      std::fill(bb.begin(), bb.end(), opmath_t(0));
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* g = tdy + i * C;
        const scalar_t* xx = tx + i * C;
        for (int64_t ch = 0; ch < cw; ++ch) {
          const opmath_t gv = static_cast<opmath_t>(g[ch]);
          pa[ch] += gv;
          pb[ch] += gv * (static_cast<opmath_t>(xx[ch]) - pm[ch]);
        }
      }
    }
    for (int64_t ch = 0; ch < cw; ++ch) {
      sdy[ch] += pa[ch];
      sdyx[ch] += pb[ch];
    }
  }
}

template <typename scalar_t>
void grad_sums_impl(const at::Tensor& dy, const at::Tensor& x, const View& v, const Split& s,
                    const std::vector<double>& mean, at::Tensor& partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  double* out = partials.mutable_data_ptr<double>();  // (splits, 2, C)
  const int64_t C = v.C, L = v.L;
  for_each_task(v, s, [&](int64_t c, int64_t k, int64_t b, int64_t e) {
    if (!v.nlc) {
      const GradSums<double> sums = channel_grad_sums_ncl<scalar_t>(pdy, px, C, L, c, b, e, mean[c]);
      out[(k * 2 + 0) * C + c] = sums.dy;
      out[(k * 2 + 1) * C + c] = sums.dyx;
      return;
    }
    // group c: channels [g0, g0 + cw), rows [b, e)
    const int64_t g0 = s.group_begin(c), cw = s.group_width(c, C);
    group_grad_sums<scalar_t>(pdy, px, C, g0, cw, b, e, mean.data() + g0, out + (k * 2 + 0) * C + g0,
                              out + (k * 2 + 1) * C + g0);
  });
}

// Rows of a channel-minor block [c0, c0 + w): out = p (u - mu) + q (v - mv) + r (the
// q term only with HAS_V), coefficients held in registers.
template <typename T, bool FULL, bool HAS_V>
inline void block_affine(const T* u, const T* v, T* out, int64_t C, int64_t rows, int64_t c0, int64_t w,
                         const T* p, const T* mu, const T* q, const T* mv, const T* r) {
  VecT<T> vp[kBlockVecs], vmu[kBlockVecs], vq[kBlockVecs], vmv[kBlockVecs], vr[kBlockVecs];
  for (int j = 0; j < kBlockVecs; ++j) {
    vp[j] = load_block<T, FULL>(p + c0, w, j);
    vmu[j] = load_block<T, FULL>(mu + c0, w, j);
    vr[j] = load_block<T, FULL>(r + c0, w, j);
    if constexpr (HAS_V) {
      vq[j] = load_block<T, FULL>(q + c0, w, j);
      vmv[j] = load_block<T, FULL>(mv + c0, w, j);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* uu = u + i * C + c0;
    T* oo = out + i * C + c0;
    for (int j = 0; j < kBlockVecs; ++j) {
      VecT<T> y = at::vec::fmadd(vp[j], load_block<T, FULL>(uu, w, j) - vmu[j], vr[j]);
      if constexpr (HAS_V) y = at::vec::fmadd(vq[j], load_block<T, FULL>(v + i * C + c0, w, j) - vmv[j], y);
      store_block<T, FULL>(y, oo, w, j);
    }
  }
}

// Per-channel coefficients of out = p * (u - mu) + q * (v - mv) + r.
struct Affine {
  std::vector<double> p, mu, q, mv, r;
  Affine() = default;  // the caller sizes p, mu and r (and q, mv for a second input)
  explicit Affine(int64_t C) : p(C, 0.0), mu(C, 0.0), q(C, 0.0), mv(C, 0.0), r(C, 0.0) {}
};

// One NCL row of L elements: out = pc (u - muc) + rc (+ qc (v - mvc) with HAS_V).
template <typename scalar_t, bool HAS_V, typename opmath_t>
inline void affine_row(const scalar_t* __restrict uu, const scalar_t* __restrict vv, scalar_t* __restrict oo,
                       int64_t L, opmath_t pc, opmath_t muc, opmath_t qc, opmath_t mvc, opmath_t rc) {
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) {
    opmath_t y = pc * (static_cast<opmath_t>(uu[i]) - muc) + rc;
    if constexpr (HAS_V) y += qc * (static_cast<opmath_t>(vv[i]) - mvc);
    oo[i] = static_cast<scalar_t>(y);
  }
}

template <typename scalar_t, bool HAS_V>
void channel_affine_impl(const at::Tensor& u, const at::Tensor* v_t, const at::Tensor& out, const View& v,
                         const Affine& a) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = v.C, L = v.L;
  std::vector<opmath_t> p(C), mu(C), q(C), mv(C), r(C);
  // one array at a time: the five in one loop did not vectorise (a scalar conversion per
  // value; with 2048 channels and 49 pixels, a tenth of a channels_last apply)
  const auto convert = [C](const std::vector<double>& from, std::vector<opmath_t>& to) {
    const double* __restrict f = from.data();
    opmath_t* __restrict t = to.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) t[c] = static_cast<opmath_t>(f[c]);
  };
  convert(a.p, p);
  convert(a.mu, mu);
  convert(a.r, r);
  if constexpr (HAS_V) {
    convert(a.q, q);
    convert(a.mv, mv);
  }
  const scalar_t* pu = u.const_data_ptr<scalar_t>();
  const scalar_t* pv = HAS_V ? v_t->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  if (!v.nlc) {
    const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(L, 1));
    at::parallel_for(0, v.N * C, grain, [&](int64_t b, int64_t e) {
      // rows b..e: channel c advances with the row (no division per row: short rows are
      // dominated by their fixed cost)
      int64_t c = b % C;
      for (int64_t row = b; row < e; ++row, c = c + 1 == C ? 0 : c + 1) {
        affine_row<scalar_t, HAS_V>(pu + row * L, HAS_V ? pv + row * L : nullptr, po + row * L, L, p[c], mu[c],
                                    q[c], mv[c], r[c]);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(C, 1));
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    at::parallel_for(0, v.N * L, grain, [&](int64_t b, int64_t e) {
      const int64_t tile_rows = std::clamp<int64_t>(kAffineTile / std::max<int64_t>(C, 1), 4, 32);
      for (int64_t r0 = b; r0 < e; r0 += tile_rows) {
        const int64_t rows = std::min(tile_rows, e - r0);
        for_each_block<opmath_t>(C, [&](auto full, int64_t c0, int64_t w) {
          block_affine<opmath_t, decltype(full)::value, HAS_V>(pu + r0 * C, HAS_V ? pv + r0 * C : nullptr,
                                                               po + r0 * C, C, rows, c0, w, p.data(), mu.data(),
                                                               q.data(), mv.data(), r.data());
        });
      }
    });
    return;
  }
  at::parallel_for(0, v.N * L, grain, [&](int64_t b, int64_t e) {
    const opmath_t* __restrict pp = p.data();
    const opmath_t* __restrict pmu = mu.data();
    const opmath_t* __restrict pq = q.data();
    const opmath_t* __restrict pmv = mv.data();
    const opmath_t* __restrict pr = r.data();
    for (int64_t row = b; row < e; ++row) {
      const scalar_t* __restrict uu = pu + row * C;
      const scalar_t* __restrict vv = HAS_V ? pv + row * C : nullptr;
      scalar_t* __restrict oo = po + row * C;
      for (int64_t c = 0; c < C; ++c) {
        opmath_t y = pp[c] * (static_cast<opmath_t>(uu[c]) - pmu[c]) + pr[c];
        if constexpr (HAS_V) y += pq[c] * (static_cast<opmath_t>(vv[c]) - pmv[c]);
        oo[c] = static_cast<scalar_t>(y);
      }
    }
  });
}

void channel_affine(const at::Tensor& u, const at::Tensor* v_t, const at::Tensor& out, const View& v,
                    const Affine& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "pyops_batch_norm_affine", [&] {
    if (v_t != nullptr) {
      channel_affine_impl<scalar_t, true>(u, v_t, out, v, a);
    } else {
      channel_affine_impl<scalar_t, false>(u, nullptr, out, v, a);
    }
  });
}

}  // namespace

// Partial moments of x (N, C, L) per channel: a (P, 3, C) float64 tensor of
// (count, mean, biased variance) rows, P partials per channel in a fixed order.
at::Tensor batch_norm_partial_stats(const at::Tensor& x, bool channels_last) {
  const View v = view_of(x, channels_last, "input");
  const Split s = split_of(v, x.element_size());
  at::Tensor partials = at::zeros({std::max<int64_t>(s.splits, 1), 3, v.C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pyops_batch_norm_stats", [&] {
    if (!v.nlc && v.L < kSmallPlane) {
      partial_stats_small<scalar_t>(x, v, s, partials);
    } else {
      partial_stats_impl<scalar_t>(x, v, s, partials);
    }
  });
  return partials;
}

// Merge (P, 3, C) partial moments, in order, into out (3, C): (count, mean, biased
// variance). With running stats, update them in place as torch does (unbiased
// variance, factor `momentum`) unless the count is 0.
void batch_norm_merge_stats(const at::Tensor& partials, const at::Tensor& out,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double momentum) {
  TORCH_CHECK(partials.dim() == 3 && partials.size(1) == 3, "partials must be (P, 3, C), got ", partials.sizes());
  const int64_t P = partials.size(0), C = partials.size(2);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(0) == 3 && out.size(1) == C,
              "out must be a contiguous (3, ", C, ") CPU tensor");
  const at::Tensor pd = partials.to(at::kDouble).contiguous();
  const double* pp = pd.const_data_ptr<double>();
  std::vector<double> n(C, 0.0), mean(C, 0.0), var(C, 0.0), m2_b(C);
  for (int64_t k = 0; k < P; ++k) {  // partials in order, all channels at once (vectorised)
    const double* nb = pp + (k * 3 + 0) * C;
    const double* vb = pp + (k * 3 + 2) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) m2_b[c] = vb[c] * nb[c];
    merge_channels(n.data(), mean.data(), var.data(), [nb](int64_t c) { return nb[c]; }, pp + (k * 3 + 1) * C,
                   m2_b.data(), C);
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) var[c] = n[c] > 0 ? var[c] / n[c] : 0.0;  // M2 -> biased variance
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "pyops_batch_norm_merge_out", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      o[c] = static_cast<scalar_t>(n[c]);
      o[C + c] = static_cast<scalar_t>(mean[c]);
      o[2 * C + c] = static_cast<scalar_t>(var[c]);
    }
  });
  auto update = [&](const c10::optional<at::Tensor>& running, bool is_var) {
    if (!running.has_value() || !running->defined()) return;
    const at::Tensor& t = *running;
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == C,
                is_var ? "running_var" : "running_mean", " must be a contiguous CPU tensor of ", C, " elements");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "pyops_batch_norm_running", [&] {
      scalar_t* pr = t.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        if (n[c] == 0) continue;
        const double stat = is_var ? var[c] * n[c] / (n[c] - 1) : mean[c];
        pr[c] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(pr[c]) + momentum * stat);
      }
    });
  };
  update(running_mean, false);
  update(running_var, true);
}

// y = (x - mean) / sqrt(var + eps) * weight + bias, per channel.
void batch_norm_apply(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                      bool channels_last) {
  const View v = view_of(x, channels_last, "input");
  check_same(x, "input", y, "output");
  if (x.numel() == 0) return;
  const auto s2 = channel_values(var, v.C, 1.0, "var");
  const auto w = channel_values(weight, v.C, 1.0, "weight");
  Affine a;  // p, mu and r: the q terms are not read without a second input
  a.p.resize(v.C);
  {
    const double* __restrict pw = w.data();
    const double* __restrict pv = s2.data();
    double* __restrict p = a.p.data();
    if (x.scalar_type() == at::kDouble) {
#pragma omp simd
      for (int64_t c = 0; c < v.C; ++c) p[c] = pw[c] / std::sqrt(pv[c] + eps);  // vectorised: -fno-math-errno
    } else {
      // in float, as torch computes it for float, half and bfloat16 inputs: double square
      // roots and divisions were most of a 2048-channel layer's setup (1x2048x1x1: ~4 of 10 us)
      const float feps = static_cast<float>(eps);
#pragma omp simd
      for (int64_t c = 0; c < v.C; ++c)
        p[c] = static_cast<double>(static_cast<float>(pw[c]) / std::sqrt(static_cast<float>(pv[c]) + feps));
    }
  }
  a.mu = channel_values(mean, v.C, 0.0, "mean");
  a.r = channel_values(bias, v.C, 0.0, "bias");
  channel_affine(x, nullptr, y, v, a);
}

// A channel's dy and x (NCL) of at most this many bytes together are read a second time from
// L2 by backward_by_channel (L2 is 1-2 MiB a core on the machines measured).
constexpr int64_t kChannelBytes = 256 * 1024;
// Planes of fewer elements than this, in more than kRowImages images, are summed by SmallPlanes
// (grad_sums_small): as rows, their masked vectors would be mostly empty (64x512x2x2: 40 -> 55 us).
constexpr int64_t kRowPlane = 32;

// Whether a backward of x (N, C, L) with both parts (training; eval with the weight's gradient)
// takes backward_by_channel: NCL, float or double, one task per channel in the reduction
// (split_of), a channel small enough for L2, and not tiny planes in many images. Its planes
// are summed with channel_grad_sums_rows (under kSmallPlane elements; the separate reduction
// then sums them so too, whatever the number of images: 8x512x7x7 26 -> 20 us, 32x2048x7x7
// 477 -> 568) or channel_grad_sums_ncl.
static bool fuses_channels(const View& v, at::ScalarType dtype) {
  if (v.nlc || (dtype != at::kFloat && dtype != at::kDouble)) return false;
  if (v.L < kRowPlane && v.N > kRowImages) return false;  // rows of a few elements: SmallPlanes sums them faster
  if (2 * v.N * v.L * static_cast<int64_t>(at::elementSize(dtype)) > kChannelBytes) return false;
  return split_of(v, 2 * static_cast<int64_t>(at::elementSize(dtype))).splits == 1;
}

// Whether a backward with both parts of x (N, C, L) takes backward_by_group: NLC, float or
// double, at most kGroupFuseRows rows, and split_of giving each group all of them (inputs
// of at most kGroupBytes, or one task). Measured (the extension's training backward, 2
// threads, fused against separate passes): 49 to 100 rows gained (2x2048x7x7 60 -> 47 us,
// 1x2048x10x10 63 -> 44, 1x4096x5x5 64 -> 52), 147 rows was even, and from 196 rows on it
// lost (4x1024x7x7 47 -> 62, 8x512x7x7 51 -> 58, 1x256x32x32 57 -> 85): the group's long
// columns of a power-of-two row stride did not stay in cache for the second pass.
constexpr int64_t kGroupFuseRows = 128;
static bool fuses_groups(const View& v, at::ScalarType dtype) {
  if (!v.nlc || (dtype != at::kFloat && dtype != at::kDouble) || v.N * v.L > kGroupFuseRows) return false;
  return split_of(v, 2 * static_cast<int64_t>(at::elementSize(dtype))).splits == 1;
}

// The two per-channel reductions of the backward in one pass, summed in a fixed order:
// out (4, C) float64 = (sum dy, sum dy * (x - mean), grad_weight, grad_bias), where
// grad_weight = sum dy * (x - mean) / sqrt(var + eps) and grad_bias = sum dy.
at::Tensor batch_norm_backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& var, double eps, bool channels_last) {
  const View v = view_of(x, channels_last, "input");
  check_same(x, "input", dy, "grad_output");
  at::Tensor out = at::empty({4, v.C}, x.options().dtype(at::kDouble));
  const auto m = channel_values(mean, v.C, 0.0, "mean");
  const auto s2 = channel_values(var, v.C, 1.0, "var");
  std::fill_n(out.mutable_data_ptr<double>(), 2 * v.C, 0.0);  // the sums (rows 2, 3 are written below)
  if (x.numel() > 0) {
    const Split s = split_of(v, 2 * x.element_size());
    at::Tensor partials = at::empty({s.splits, 2, v.C}, out.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pyops_batch_norm_grad_sums", [&] {
      if (!v.nlc && v.L < kSmallPlane && (s.per <= kRowImages || fuses_channels(v, x.scalar_type())) &&
          std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
        grad_sums_rows<scalar_t>(dy, x, v, s, m, partials);
      } else if (!v.nlc && v.L < kSmallPlane) {
        grad_sums_small<scalar_t>(dy, x, v, s, m, partials);
      } else {
        grad_sums_impl<scalar_t>(dy, x, v, s, m, partials);
      }
    });
    const double* pp = partials.const_data_ptr<double>();
    double* o = out.mutable_data_ptr<double>();
    for (int64_t k = 0; k < s.splits; ++k)
      for (int64_t c = 0; c < 2 * v.C; ++c) o[c] += pp[k * 2 * v.C + c];
  }
  double* o = out.mutable_data_ptr<double>();
  const double* __restrict sum_dy = o;
  const double* __restrict sum_dyx = o + v.C;
  const double* __restrict pv = s2.data();
  double* __restrict gw = o + 2 * v.C;
  double* __restrict gb = o + 3 * v.C;
#pragma omp simd
  for (int64_t c = 0; c < v.C; ++c) {
    gw[c] = sum_dyx[c] / std::sqrt(pv[c] + eps);
    gb[c] = sum_dy[c];
  }
  return out;
}

// The training input gradient's per-channel coefficients on (x - mean) and on 1, q and r in
// dx = p dy + q (x - mean) + r, from p = weight / sqrt(var + eps), the two gradient sums and the
// channel's count and variance (batch_norm_backward_input and backward_by_channel).
struct TrainingGradCoefs {
  double q, r;
};
static inline TrainingGradCoefs training_grad_coefs(double p, double sum_dy, double sum_dyx, double count,
                                                    double var, double eps) {
  const double k = sum_dyx / (count * (var + eps));
  return {-p * k, -p * sum_dy / count};
}

// grad_input of batch norm. Training (batch statistics, `count` elements per channel):
//   dx = (dy - sum_dy / M - (x - mean) * sum_dy_xmu / (M (var + eps))) * weight / sqrt(var + eps)
// with sums = (sum_dy, sum_dy_xmu) (2, C); eval (running statistics): dx = dy * weight / sqrt(var + eps).
void batch_norm_backward_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                               const at::Tensor& mean, const at::Tensor& var,
                               const c10::optional<at::Tensor>& weight, const at::Tensor& sums,
                               const at::Tensor& count, double eps, bool training, bool channels_last) {
  const View v = view_of(x, channels_last, "input");
  check_same(x, "input", dy, "grad_output");
  check_same(x, "input", dx, "grad_input");
  if (x.numel() == 0) return;
  const auto s2 = channel_values(var, v.C, 1.0, "var");
  const auto w = channel_values(weight, v.C, 1.0, "weight");
  Affine a(v.C);
  double* __restrict p = a.p.data();
  {
    const double* __restrict pw = w.data();
    const double* __restrict pv = s2.data();
#pragma omp simd
    for (int64_t c = 0; c < v.C; ++c) p[c] = pw[c] / std::sqrt(pv[c] + eps);
  }
  if (!training) {
    channel_affine(dy, nullptr, dx, v, a);
    return;
  }
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) >= 2 && sums.size(1) == v.C, "sums must be (2, C)");
  const at::Tensor sd = sums.to(at::kDouble).contiguous();
  const double* __restrict ps = sd.const_data_ptr<double>();
  const auto m = channel_values(mean, v.C, 0.0, "mean");
  const auto n = channel_values(count, v.C, 1.0, "count");
  const double* __restrict pm = m.data();
  const double* __restrict pn = n.data();
  const double* __restrict pv = s2.data();
  double* __restrict q = a.q.data();
  double* __restrict mv = a.mv.data();
  double* __restrict r = a.r.data();
#pragma omp simd
  for (int64_t c = 0; c < v.C; ++c) {
    const TrainingGradCoefs qr = training_grad_coefs(p[c], ps[c], ps[v.C + c], pn[c], pv[c], eps);
    q[c] = qr.q;
    mv[c] = pm[c];
    r[c] = qr.r;
  }
  channel_affine(dy, &x, dx, v, a);
}

namespace {

// What both one-call backwards read per channel, as doubles, and their (4, C) float64 result
// (batch_norm_backward_reduce's rows); count is 1 in eval.
struct FusedBackward {
  std::vector<double> mean, var, weight, count;
  at::Tensor red;
  FusedBackward(const at::Tensor& x, int64_t C, const at::Tensor& m, const at::Tensor& v,
                const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& n)
      : mean(channel_values(m, C, 0.0, "mean")),
        var(channel_values(v, C, 1.0, "var")),
        weight(channel_values(w, C, 1.0, "weight")),
        count(channel_values(n, C, 1.0, "count")),
        red(at::empty({4, C}, x.options().dtype(at::kDouble))) {}
};

// The channels [c0, c0 + n) of the fused backward, from their two gradient sums (sum dy, sum
// dy (x - mean), in o's rows 0 and 1) and their statistics (batch statistics in training,
// running ones in eval): their four reduce values into o (4, C) as batch_norm_backward_reduce
// gives them, and their input gradients' coefficients, dx = p dy + q (x - mean) + r (eval:
// q = r = 0, mv = 0), as batch_norm_backward_input computes them, into k's arrays (n each).
// One vectorised loop: channel by channel, its double square roots and divisions were most
// of the fused backward of 8x2048x1x1.
template <typename T>
struct GradCoefs {
  std::vector<T> p, mu, q, mv, r;
  explicit GradCoefs(int64_t n) : p(n), mu(n, T(0)), q(n), mv(n), r(n) {}
};
template <bool TRAIN, typename T>
inline void channel_grads(double* o, int64_t C, int64_t c0, int64_t n, const double* w, const double* var,
                          const double* count, const double* mean, double eps, GradCoefs<T>& k) {
  double* __restrict sdy = o + c0;
  double* __restrict sdyx = o + C + c0;
  double* __restrict gw = o + 2 * C + c0;
  double* __restrict gb = o + 3 * C + c0;
  const double* __restrict pw = w + c0;
  const double* __restrict pv = var + c0;
  const double* __restrict pn = count + c0;
  const double* __restrict pm = mean + c0;
  T* __restrict p = k.p.data();
  T* __restrict q = k.q.data();
  T* __restrict mv = k.mv.data();
  T* __restrict r = k.r.data();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double sum_dy = 0.0 + sdy[i], sum_dyx = 0.0 + sdyx[i];  // as the reduce adds its partials to 0
    sdy[i] = sum_dy;
    sdyx[i] = sum_dyx;
    gw[i] = sum_dyx / std::sqrt(pv[i] + eps);
    gb[i] = sum_dy;
    const double pd = pw[i] / std::sqrt(pv[i] + eps);
    p[i] = static_cast<T>(pd);
    if constexpr (TRAIN) {
      const TrainingGradCoefs qr = training_grad_coefs(pd, sum_dy, sum_dyx, pn[i], pv[i], eps);
      q[i] = static_cast<T>(qr.q);
      mv[i] = static_cast<T>(pm[i]);
      r[i] = static_cast<T>(qr.r);
    } else {
      q[i] = T(0);
      mv[i] = T(0);
      r[i] = T(0);
    }
  }
}

// Channels of backward_by_channel summed before their input gradients are written: their
// coefficients in one vectorised loop, their rows (at most kChannelBytes each) still in L2.
constexpr int64_t kChannelBlock = 16;

// The backward with both parts asked for (training; eval when the weight or bias needs its
// gradient too), NCL inputs that fuses_channels takes, one channel at a time: its two sums,
// then its input gradient while its rows are still in L1 or L2, where the separate passes
// (batch_norm_backward_reduce, then batch_norm_backward_input) read dy (and x) twice from
// memory or L3 (training, the node's backward on 2x2048x7x7 float32, 2 threads: 90 -> 53
// us). The same arithmetic (channel_grad_sums_rows / _ncl, channel_grads, affine_row), so the
// same results, bit for bit. The (4, C) float64 sums go to f.red as batch_norm_backward_reduce
// gives them.
template <typename T, bool TRAIN>
void backward_by_channel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const View& v,
                         FusedBackward& f, double eps) {
  const int64_t N = v.N, C = v.C, L = v.L;
  const std::vector<double>& m = f.mean;
  const T* pdy = dy.const_data_ptr<T>();
  const T* px = x.const_data_ptr<T>();
  T* pdx = dx.mutable_data_ptr<T>();
  double* o = f.red.mutable_data_ptr<double>();
  // blocks of channels small enough that their rows stay in L2 between the two steps
  const int64_t block = std::clamp<int64_t>(kChannelBytes / std::max<int64_t>(2 * N * L * sizeof(T), 1), 1,
                                            kChannelBlock);
  const int64_t blocks = (C + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(block * N * L, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
    GradCoefs<T> k(block);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t c0 = blk * block, n = std::min(block, C - c0);
      for (int64_t c = c0; c < c0 + n; ++c) {
        const GradSums<double> sums = L < kSmallPlane
                                          ? channel_grad_sums_rows<T>(pdy, px, C, L, c, 0, N, static_cast<T>(m[c]))
                                          : channel_grad_sums_ncl<T>(pdy, px, C, L, c, 0, N, m[c]);
        o[c] = sums.dy;
        o[C + c] = sums.dyx;
      }
      channel_grads<TRAIN>(o, C, c0, n, f.weight.data(), f.var.data(), f.count.data(), m.data(), eps, k);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t img = 0; img < N; ++img) {
          const int64_t row = img * C + c0 + i;
          affine_row<T, TRAIN>(pdy + row * L, TRAIN ? px + row * L : nullptr, pdx + row * L, L, k.p[i], T(0), k.q[i],
                               k.mv[i], k.r[i]);
        }
    }
  });
}

// The same for NLC inputs that fuses_groups takes: one group of channels of split_of at a
// time (its rows are all the rows), its sums as batch_norm_backward_reduce's task for the
// group gives them (group_grad_sums), then its input gradient from L2 by blocks of channels
// (block_affine, as channel_affine). See fuses_groups for where it gains.
template <typename T, bool TRAIN>
void backward_by_group(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx, const View& v,
                       const Split& s, FusedBackward& f, double eps) {
  const int64_t C = v.C, rows = v.N * v.L;
  const std::vector<double>& m = f.mean;
  const T* pdy = dy.const_data_ptr<T>();
  const T* px = x.const_data_ptr<T>();
  T* pdx = dx.mutable_data_ptr<T>();
  double* o = f.red.mutable_data_ptr<double>();
  at::parallel_for(0, s.groups, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const int64_t g0 = s.group_begin(g), cw = s.group_width(g, C);
      group_grad_sums<T>(pdy, px, C, g0, cw, 0, rows, m.data() + g0, o + g0, o + C + g0);
      GradCoefs<T> k(cw);
      channel_grads<TRAIN>(o, C, g0, cw, f.weight.data(), f.var.data(), f.count.data(), m.data(), eps, k);
      const int64_t tile_rows = std::clamp<int64_t>(kAffineTile / cw, 4, 32);
      for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
        const int64_t n = std::min(tile_rows, rows - r0);
        const int64_t off = r0 * C + g0;
        for_each_block<T>(cw, [&](auto full, int64_t c0, int64_t bw) {
          block_affine<T, decltype(full)::value, TRAIN>(pdy + off, TRAIN ? px + off : nullptr, pdx + off, C, n, c0,
                                                        bw, k.p.data(), k.mu.data(), k.q.data(), k.mv.data(),
                                                        k.r.data());
        });
      }
    }
  });
}

}  // namespace

// The statistics dtype: float64 for float64 inputs, else float32.
static at::ScalarType stats_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An uninitialised tensor shaped and stored like the (N, C, L) view x (NCL or NLC).
static at::Tensor empty_like_view(const at::Tensor& x) { return at::empty_strided(x.sizes(), x.strides(), x.options()); }

// The training forward in one call: statistics, running-stat update and normalisation
// (partial_stats + merge_stats + apply). Returns (y, stats (3, C): count, mean, biased var).
std::tuple<at::Tensor, at::Tensor> batch_norm_train_forward(const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& running_mean,
                                                            const c10::optional<at::Tensor>& running_var,
                                                            const c10::optional<at::Tensor>& weight,
                                                            const c10::optional<at::Tensor>& bias, double momentum,
                                                            double eps, bool channels_last) {
  const View v = view_of(x, channels_last, "input");
  at::Tensor stats = at::empty({3, v.C}, x.options().dtype(stats_type(x)));
  batch_norm_merge_stats(batch_norm_partial_stats(x, channels_last), stats, running_mean, running_var, momentum);
  at::Tensor y = empty_like_view(x);
  batch_norm_apply(x, y, stats.select(0, 1), stats.select(0, 2), weight, bias, eps, channels_last);
  return {y, stats};
}

// The whole backward in one call: (grad_input, (4, C) sums as batch_norm_backward_reduce
// gives them, in the statistics dtype). `count` given: training (batch statistics);
// absent: eval (running statistics). A part not asked for comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& var,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& count, double eps,
                                                       bool need_input, bool need_reduce, bool channels_last) {
  const bool training = count.has_value() && count->defined();
  at::Tensor red, dx;
  if (need_input && (training || need_reduce) && x.numel() > 0) {
    const View v = view_of(x, channels_last, "input");
    const bool by_channel = fuses_channels(v, x.scalar_type());
    if (by_channel || fuses_groups(v, x.scalar_type())) {
      check_same(x, "input", dy, "grad_output");
      dx = empty_like_view(x);
      const Split s = split_of(v, 2 * x.element_size());
      FusedBackward f(x, v.C, mean, var, weight, training ? count : c10::nullopt);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyops_batch_norm_backward_fused", [&] {
        if (by_channel && training) {
          backward_by_channel<scalar_t, true>(dy, x, dx, v, f, eps);
        } else if (by_channel) {
          backward_by_channel<scalar_t, false>(dy, x, dx, v, f, eps);
        } else if (training) {
          backward_by_group<scalar_t, true>(dy, x, dx, v, s, f, eps);
        } else {
          backward_by_group<scalar_t, false>(dy, x, dx, v, s, f, eps);
        }
      });
      return {dx, f.red.to(stats_type(x))};
    }
  }
  if (need_reduce || (training && need_input)) red = batch_norm_backward_reduce(dy, x, mean, var, eps, channels_last);
  if (need_input) {
    dx = empty_like_view(x);
    batch_norm_backward_input(dy, x, dx, mean, var, weight, training ? red : var, training ? *count : var, eps,
                              training, channels_last);
  }
  const auto empty = [&] { return at::empty({0}, x.options().dtype(stats_type(x))); };
  return {dx.defined() ? dx : at::empty({0}, x.options()), red.defined() ? red.to(stats_type(x)) : empty()};
}

// Second derivatives of batch norm: the gradient of
//   L = <ggx, grad_input> + <ggw, grad_weight> + <ggb, grad_bias>
// with respect to (grad_output g, input x, weight w), all (N, C, L) views but w (C). Per
// channel, with s = 1 / sqrt(var + eps), xhat = (x - mean) s, M = N * L and
// P(v) = v - mean(v) - xhat mean(v xhat) (what training's input gradient applies to g):
//   training: grad_input = w s P(g), grad_weight = sum(g xhat), grad_bias = sum(g);
//     d/dg = w s P(ggx) + ggw xhat + ggb
//     d/dx = -(w s^2 / M) (xhat sum(ggx P(g)) + sum(ggx xhat) P(g)) - w s^2 mean(g xhat) P(ggx)
//            + ggw s P(g)            (mean and s depend on x)
//     d/dw = s sum(ggx P(g))
//   eval (running statistics, constants): grad_input = w s g;
//     d/dg = w s ggx + ggw xhat + ggb,  d/dx = ggw s g,  d/dw = s sum(ggx g).
// Tensor arithmetic in float32 (float64 for float64), used only when a backward is itself
// differentiated (create_graph); its result is once-differentiable. Absent parts: undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const c10::optional<at::Tensor>& ggx_, const c10::optional<at::Tensor>& ggw_,
    const c10::optional<at::Tensor>& ggb_, const at::Tensor& g_, const at::Tensor& x_,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, double eps,
    bool training) {
  const auto op = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto channel = [&](const at::Tensor& t) { return t.to(op).view({1, -1, 1}); };
  const at::Tensor g = g_.to(op), x = x_.to(op);
  const at::Tensor s = channel((var.to(op) + eps).rsqrt()), xhat = (x - channel(mean)) * s;
  const at::Tensor w = weight.has_value() && weight->defined() ? channel(*weight) : at::ones_like(s);
  const bool has_ggx = ggx_.has_value() && ggx_->defined(), has_ggw = ggw_.has_value() && ggw_->defined();
  const bool has_ggb = ggb_.has_value() && ggb_->defined();
  const std::vector<int64_t> dims{0, 2};
  const auto sum = [&](const at::Tensor& t) { return t.sum(dims, /*keepdim=*/true); };
  const double M = static_cast<double>(x.size(0) * x.size(2));
  at::Tensor dg = at::zeros_like(g), dx = at::zeros_like(x), dw = at::zeros_like(s);
  if (training) {
    const auto project = [&](const at::Tensor& v) { return v - sum(v) / M - xhat * (sum(v * xhat) / M); };
    const at::Tensor Pg = project(g);
    if (has_ggx) {
      const at::Tensor u = ggx_->to(op), Pu = project(u), u_Pg = sum(u * Pg);
      dg += w * s * Pu;
      dx -= w * s * s * ((xhat * u_Pg + sum(u * xhat) * Pg) / M + sum(g * xhat) / M * Pu);
      dw += s * u_Pg;
    }
    if (has_ggw) dx += channel(*ggw_) * s * Pg;
  } else {
    if (has_ggx) {
      const at::Tensor u = ggx_->to(op);
      dg += w * s * u;
      dw += s * sum(u * g);
    }
    if (has_ggw) dx += channel(*ggw_) * s * g;
  }
  if (has_ggw) dg += channel(*ggw_) * xhat;
  if (has_ggb) dg += channel(*ggb_);
  return {dg.to(g_.scalar_type()), dx.to(x_.scalar_type()), dw.view({-1})};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A saved optional tensor (undefined when it was absent) as the optional argument it was.
c10::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; }

// The strides of a dense tensor of `sizes` in torch's contiguous format or, for 4-D and 5-D
// sizes, channels_last (channels innermost, then the spatial dims, then N).
std::vector<int64_t> format_strides(at::IntArrayRef sizes, bool channels_last) {
  const int64_t d = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> order;  // innermost dim first
  if (channels_last && (d == 4 || d == 5)) {
    order.push_back(1);
    for (int64_t i = d - 1; i > 1; --i) order.push_back(i);
    order.push_back(0);
  } else {
    for (int64_t i = d - 1; i >= 0; --i) order.push_back(i);
  }
  std::vector<int64_t> strides(d);
  int64_t step = 1;
  for (const int64_t dim : order) {
    strides[dim] = step;
    step *= std::max<int64_t>(sizes[dim], 1);
  }
  return strides;
}

// The dense t with `strides`, which differ from its own only on size-1 dims (no copy).
at::Tensor restrided(const at::Tensor& t, at::IntArrayRef strides) {
  return t.strides() == strides ? t : t.as_strided(t.sizes(), strides);
}

// The kernels' (N, C, L) result y3 as the output of input x, with torch's strides: those of a
// contiguous or (channel-minor) channels_last tensor, also on size-1 dims; an empty input
// gives an empty output with x's strides, as torch (which clones an empty input). As
// pyops.ops.batch_norm.output_like.
at::Tensor output_like(const at::Tensor& y3, const at::Tensor& x, bool channels_last) {
  if (x.numel() == 0) return at::empty_like(x);
  return restrided(y3.view(x.sizes()), format_strides(x.sizes(), channels_last));
}

// The kernels' (N, C, L) input gradient shaped as x: with x's own strides when x is dense in
// the same order (torch's empty_like(x)), as pyops.ops.batch_norm.grad_input_like.
at::Tensor grad_input_like(const at::Tensor& dx3, const at::Tensor& x) {
  const at::Tensor dx = dx3.view(x.sizes());
  return x.is_non_overlapping_and_dense() && same_layout(dx, x) ? restrided(dx, x.strides()) : dx;
}

// `grad` in the storage order of the (N, C, L) view x3 (copied only when it is not).
at::Tensor like_view(const at::Tensor& grad, const at::Tensor& x3) {
  at::Tensor g = grad.reshape(x3.sizes());
  if (same_layout(g, x3)) return g;
  at::Tensor out = empty_like_view(x3);
  out.copy_(g);
  return out;
}

// Batch norm's backward as a node of its own, for a backward that is differentiated again
// (create_graph): (grad_input, grad_weight, grad_bias) of (g3, x3, weight) from the same
// kernels, with batch_norm_double_backward as its (once-differentiable) gradient.
struct BatchNormGradNode : public torch::autograd::Function<BatchNormGradNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& g3, const at::Tensor& x3,
                               const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
                               const c10::optional<at::Tensor>& count, double eps, bool channels_last) {
    at::Tensor dx, red;
    std::tie(dx, red) = batch_norm_backward(g3, x3, mean, var, weight, count, eps, true, true, channels_last);
    const bool training = count.has_value() && count->defined();
    ctx->save_for_backward({g3, x3, weight.value_or(at::Tensor()), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    ctx->saved_data["weight_edge"] = given(weight) ? int64_t{2} : int64_t{-1};
    return {dx, red.select(0, 2), red.select(0, 3)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g3 = saved[0], &x3 = saved[1], &weight = saved[2], &mean = saved[3], &var = saved[4];
    return once_differentiable(grads, [&] {
      at::Tensor dg, dx, dw;
      std::tie(dg, dx, dw) = batch_norm_double_backward(opt(grads[0]), opt(grads[1]), opt(grads[2]), g3, x3,
                                                        opt(weight), mean, var, ctx->saved_data["eps"].toDouble(),
                                                        ctx->saved_data["training"].toBool());
      variable_list out(8);
      out[0] = dg;
      out[1] = dx;
      if (ctx->saved_data["weight_edge"].toInt() >= 0) out[2] = dw.to(weight.scalar_type());
      return out;
    });
  }
};

// Batch norm as a C++ autograd node (see autograd.h): the same two entries as the Python
// BatchNormFunction (train_forward or apply, then backward); the Function's per-call cost
// (~60 us per layer forward + backward) is more than the kernels of a small layer. x is
// the differentiable input; x3 its detached (N, C, L) view in the kernels' storage order.
struct BatchNormNode : public torch::autograd::Function<BatchNormNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& x3,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, bool training, double momentum, double eps,
                            bool channels_last) {
    at::Tensor y3, mean, var, count;
    std::tie(y3, mean, var, count) =
        output(x3, running_mean, running_var, weight, bias, training, momentum, eps, channels_last);
    ctx->save_for_backward({x3, weight.value_or(at::Tensor()), mean, var, count, x});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : x.scalar_type();
    // needs_input_grad counts the tensor arguments given: x, x3, then those of the rest present
    const int64_t w_edge = 2 + given(running_mean) + given(running_var);
    ctx->saved_data["weight_edge"] = given(weight) ? w_edge : int64_t{-1};
    ctx->saved_data["bias_edge"] = given(bias) ? w_edge + given(weight) : int64_t{-1};
    return output_like(y3, x, channels_last);
  }

  // (y3, mean, var, count) of the forward: batch statistics and count (training, running
  // stats updated) or the running statistics and an undefined count (eval).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> output(
      const at::Tensor& x3, const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool training, double momentum,
      double eps, bool channels_last) {
    if (training) {
      at::Tensor y3, stats;
      std::tie(y3, stats) =
          batch_norm_train_forward(x3, running_mean, running_var, weight, bias, momentum, eps, channels_last);
      return {y3, stats.select(0, 1), stats.select(0, 2), stats.select(0, 0)};
    }
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), "running stats must be given in eval mode");
    at::Tensor y3 = empty_like_view(x3);
    batch_norm_apply(x3, y3, *running_mean, *running_var, weight, bias, eps, channels_last);
    return {y3, *running_mean, *running_var, at::Tensor()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x3 = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3], &count = saved[4],
                     &x = saved[5];
    const int64_t w_edge = ctx->saved_data["weight_edge"].toInt(), b_edge = ctx->saved_data["bias_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0), need_w = w_edge >= 0 && ctx->needs_input_grad(w_edge),
               need_b = b_edge >= 0 && ctx->needs_input_grad(b_edge);
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool cl = ctx->saved_data["channels_last"].toBool();
    variable_list out(10);
    if (at::GradMode::is_enabled()) {  // create_graph: a backward that differentiates again
      const auto parts = BatchNormGradNode::apply(like_view(grads[0], x3), like_view(x, x3), opt(weight), mean, var,
                                                  opt(count), eps, cl);
      if (need_x) out[0] = grad_input_like(parts[0], x);
      if (need_w) out[4] = parts[1].to(weight.scalar_type());
      if (need_b) out[5] = parts[2].to(ctx->saved_data["bias_dtype"].toScalarType());
      return out;
    }
    at::Tensor dx, red;
    std::tie(dx, red) = batch_norm_backward(like_view(grads[0], x3), x3, mean, var, opt(weight), opt(count), eps,
                                            need_x, need_w || need_b, cl);
    if (need_x) out[0] = grad_input_like(dx, x);
    if (need_w) out[4] = red.select(0, 2).to(weight.scalar_type());
    if (need_b) out[5] = red.select(0, 3).to(ctx->saved_data["bias_dtype"].toScalarType());
    return out;
  }
};

}  // namespace

// Whether batch norm of x (N, C, *) runs, and returns, channel-minor: torch's channels_last
// rule (suggest_memory_format; contiguous tensors are channel-major), as pyops.ops.batch_norm.is_nlc.
static bool runs_channel_minor(const at::Tensor& x) {
  return (x.dim() == 4 || x.dim() == 5) && !x.is_contiguous() &&
         x.suggest_memory_format() != at::MemoryFormat::Contiguous;
}

// The (N, C, L) view of x the kernels read, in its storage order (copied only when x is not
// dense in it): made below autograd, a detached kernel operand, as pyops.ops.batch_norm.as_ncl.
static at::Tensor ncl_operand(const at::Tensor& x, bool channels_last) {
  const at::AutoDispatchBelowADInplaceOrView kernel_views;
  const int64_t N = x.size(0), C = x.size(1), L = c10::multiply_integers(x.sizes().slice(2));
  const at::Tensor t = channels_last ? x.movedim(1, -1).contiguous().movedim(-1, 1) : x.contiguous();
  return t.view({N, C, L});
}

at::Tensor batch_norm_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, bool training, double momentum, double eps) {
  TORCH_CHECK(!running_mean.has_value() || running_mean->is_contiguous(), "pyops: running_mean must be contiguous");
  TORCH_CHECK(!running_var.has_value() || running_var->is_contiguous(), "pyops: running_var must be contiguous");
  const bool channels_last = runs_channel_minor(x);
  const at::Tensor x3 = ncl_operand(x, channels_last);
  if (records_node({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())}))
    return BatchNormNode::apply(x, x3, running_mean, running_var, weight, bias, training, momentum, eps,
                                channels_last);
  const at::Tensor y3 =
      std::get<0>(BatchNormNode::output(x3, running_mean, running_var, weight, bias, training, momentum, eps,
                                        channels_last));
  return output_like(y3, x, channels_last);
}

}  // namespace pyops
