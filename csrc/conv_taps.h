// Direct float32 convolution by register-blocked taps (csrc/conv_taps.cpp): the CPU path
// of conv2d's forward and gradients (and conv_transpose2d's forward) where it beats
// im2col + BLAS, NCHW and channels_last.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pyops {

// [lo, hi): the outputs o in [0, out) whose input o * stride + offset lies in [0, size)
// (im2col's tap columns, the padded copies' in-plane columns).
inline void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out, int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = size - offset <= 0 ? 0 : (size - offset - 1) / stride + 1;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

// One group of a convolution: Kout output planes (OH, OW) from Cin dense input planes
// (H, W), taps (r, s) reading input (oh * sh + r * dh - ph, ow * sw + s * dw - pw); ph and
// pw may be negative. Images are x_image / y_image elements apart; output element
// (k, oh, ow) of an image is at k * y_plane + oh * y_row + ow * y_col. x_pixel == 0: x's
// planes are dense (element (c, h, w) at c * H * W + h * W + w); else x is channels_last,
// element (c, h, w) at (h * W + w) * x_pixel + c.
struct TapConv {
  int64_t N, Cin, Kout, H, W, OH, OW, R, S, sh, sw, dh, dw, ph, pw, x_image, y_image, y_plane, y_row, y_col;
  int64_t x_pixel = 0;
};

// Whether this build has the kernel (AVX-512 or AVX2) and whether it pays for this shape.
bool tap_conv_suits(const TapConv& c);

// Whether the channel-lane kernel (vectors over output channels) runs this shape: always
// for channels_last input, else where it wastes fewer lanes than the positions kernel
// (vectors over output positions); pack and run follow it.
bool tap_conv_lanes(const TapConv& c);

// The weights in the kernel's order: tap (r, s) takes tap taps[r * S + s] of w's w_taps
// per filter, w being (Kout, Cin, w_taps) contiguous, or (transposed: the input
// gradient's filter) (Cin, Kout, w_taps).
at::Tensor tap_conv_pack(const float* w, const TapConv& c, const std::vector<int64_t>& taps, int64_t w_taps,
                         bool transposed);

// y (every image's Kout planes, overwritten) = the convolution of x with packed weights.
void tap_conv_run(const float* x, const at::Tensor& packed, float* y, const TapConv& c);

// dw (Kout, Cin, R, S), overwritten = the weight gradient of dy (every image's Kout
// planes, y_image apart, dense or channels_last as y's strides say) for input x.
void tap_conv_weight_grad(const float* x, const float* dy, float* dw, const TapConv& c);

// Whether tap_conv_weight_grad pays for this shape: tap_conv_suits, and planes of at least
// 512 output pixels or fewer than 128 x 128 channel pairs. Its (Cin * R * S, Kout) partial
// sums are added to once per image and block of rows; on small planes of many channels
// that traffic outweighs the GEMM it replaces, which runs those operands at a good rate
// (2 threads, 3x3 on 2x256x14x14: NCHW 2.9 -> 2.4 ms by GEMM, channels_last 6.5 against
// 5.1 on one thread), while few channels favour the kernel (4x64x20x20 channels_last: 0.74
// against GEMM's 0.86-0.95).
bool tap_conv_weight_grad_suits(const TapConv& c);

}  // namespace pyops
