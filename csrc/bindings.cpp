// The one binding file of pyops._C: plain functions, wrapped as torch.library
// custom operators on the Python side (pyops/ops/*).
#include <torch/extension.h>

#include "common.h"
#include "pooling.h"

namespace pyops {
void sigmoid_forward(const at::Tensor& x, const at::Tensor& y);
void sigmoid_backward(const at::Tensor& grad_output, const at::Tensor& output,
                      const at::Tensor& grad_input);
at::Tensor sigmoid_autograd(const at::Tensor& x);
void dropout_apply(const at::Tensor& input, const at::Tensor& out, const at::Tensor& seed_offset,
                   int64_t threshold, double scale, const c10::optional<at::Tensor>& keep_bits_out);
void dropout_apply_bits(const at::Tensor& input, const at::Tensor& out, const at::Tensor& keep_bits,
                        double scale);
at::Tensor philox_blocks(int64_t seed, int64_t offset, int64_t first, int64_t n);
void conv2d_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& y, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups, bool channels_last);
void conv2d_input_grad(const at::Tensor& dy, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& dx, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool channels_last);
void conv2d_weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dw, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool channels_last);
void channel_sum(const at::Tensor& grad, const at::Tensor& out, bool channels_last);
at::Tensor batch_norm_partial_stats(const at::Tensor& x, bool channels_last);
void batch_norm_merge_stats(const at::Tensor& partials, const at::Tensor& out,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double momentum);
void batch_norm_apply(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                      bool channels_last);
at::Tensor batch_norm_backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& var, double eps, bool channels_last);
void batch_norm_backward_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                               const at::Tensor& mean, const at::Tensor& var,
                               const c10::optional<at::Tensor>& weight, const at::Tensor& sums,
                               const at::Tensor& count, double eps, bool training, bool channels_last);
std::tuple<at::Tensor, at::Tensor> batch_norm_train_forward(const at::Tensor& x,
                                                            const c10::optional<at::Tensor>& running_mean,
                                                            const c10::optional<at::Tensor>& running_var,
                                                            const c10::optional<at::Tensor>& weight,
                                                            const c10::optional<at::Tensor>& bias, double momentum,
                                                            double eps, bool channels_last);
std::tuple<at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& var,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& count, double eps,
                                                       bool need_input, bool need_reduce, bool channels_last);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const c10::optional<at::Tensor>& ggx, const c10::optional<at::Tensor>& ggw, const c10::optional<at::Tensor>& ggb,
    const at::Tensor& g, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& var, double eps, bool training);
at::Tensor batch_norm_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, bool training, double momentum, double eps);
at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                           int64_t groups, std::vector<int64_t> out_hw, bool channels_last, bool transposed);
}  // namespace pyops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyops CPU kernels";
  m.def("sigmoid_forward", &pyops::sigmoid_forward, "sigmoid forward (CPU)");
  m.def("sigmoid_backward", &pyops::sigmoid_backward, "sigmoid backward (CPU)");
  m.def("sigmoid_autograd", &pyops::sigmoid_autograd, "sigmoid as a C++ autograd node (CPU)");
  m.def("dropout_apply", &pyops::dropout_apply, "dropout forward/backward (CPU), optionally writing the keep bits",
        py::arg("input"), py::arg("out"), py::arg("seed_offset"), py::arg("threshold"), py::arg("scale"),
        py::arg("keep_bits_out") = py::none());
  m.def("dropout_apply_bits", &pyops::dropout_apply_bits, "dropout's mask from saved keep bits (CPU)");
  m.def("philox_blocks", &pyops::philox_blocks, "raw Philox4x32-10 blocks (CPU)");
  m.def("max_pool2d_forward", &pyops::max_pool2d_forward, "max_pool2d forward (CPU)");
  m.def("max_pool2d_backward", &pyops::max_pool2d_backward, "max_pool2d backward (CPU)");
  m.def("avg_pool2d_forward", &pyops::avg_pool2d_forward, "avg_pool2d forward (CPU)");
  m.def("avg_pool2d_backward", &pyops::avg_pool2d_backward, "avg_pool2d backward (CPU)");
  m.def("conv2d_forward", &pyops::conv2d_forward, "conv2d forward (CPU)");
  m.def("conv2d_input_grad", &pyops::conv2d_input_grad, "conv2d input gradient / conv_transpose2d (CPU)");
  m.def("conv2d_weight_grad", &pyops::conv2d_weight_grad, "conv2d weight gradient (CPU)");
  m.def("channel_sum", &pyops::channel_sum, "per-channel sum, the bias gradient (CPU)");
  m.def("batch_norm_partial_stats", &pyops::batch_norm_partial_stats, "batch norm partial moments (CPU)");
  m.def("batch_norm_merge_stats", &pyops::batch_norm_merge_stats, "merge moments, update running stats (CPU)");
  m.def("batch_norm_apply", &pyops::batch_norm_apply, "batch norm normalisation (CPU)");
  m.def("batch_norm_backward_reduce", &pyops::batch_norm_backward_reduce, "batch norm gradient sums (CPU)");
  m.def("batch_norm_backward_input", &pyops::batch_norm_backward_input, "batch norm input gradient (CPU)");
  m.def("batch_norm_train_forward", &pyops::batch_norm_train_forward,
        "batch norm training forward: stats, running stats, normalisation (CPU)");
  m.def("batch_norm_backward", &pyops::batch_norm_backward, "batch norm backward: sums and grad_input (CPU)");
  m.def("batch_norm_double_backward", &pyops::batch_norm_double_backward,
        "batch norm's second derivatives (tensor arithmetic, any device)");
  m.def("batch_norm_autograd", &pyops::batch_norm_autograd, "batch norm as a C++ autograd node (CPU)");
  m.def("conv2d_autograd", &pyops::conv2d_autograd, "conv2d / conv_transpose2d as a C++ autograd node (CPU)");
  m.def("max_pool2d_autograd", &pyops::max_pool2d_autograd, "max_pool2d as a C++ autograd node (CPU)");
  m.def("avg_pool2d_autograd", &pyops::avg_pool2d_autograd, "avg_pool2d as a C++ autograd node (CPU)");
  m.def("simd_level", []() {
#if defined(CPU_CAPABILITY_AVX512)
    return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
    return "AVX2";
#else
    return "DEFAULT";
#endif
  });
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}
