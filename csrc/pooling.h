// The CPU pooling entries (csrc/pooling.cpp) and their autograd nodes (csrc/pooling_nodes.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace pyops {

void max_pool2d_forward(const at::Tensor& input, const at::Tensor& output, const at::Tensor& indices,
                        at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation);
void max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& grad_input,
                         at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation);
void avg_pool2d_forward(const at::Tensor& input, const at::Tensor& output, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad,
                        int64_t divisor_override);
void avg_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& grad_input, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding, bool count_include_pad,
                         int64_t divisor_override);

// (output, indices) of max pooling, recording a C++ autograd node; out_hw is the output
// size pyops/_pool.py computed, channels_last the input's layout (the output keeps it).
std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& x, std::vector<int64_t> kernel,
                                                       std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                       std::vector<int64_t> dilation, std::vector<int64_t> out_hw,
                                                       bool channels_last);
at::Tensor avg_pool2d_autograd(const at::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> out_hw, bool count_include_pad,
                               int64_t divisor_override, bool channels_last);

}  // namespace pyops
