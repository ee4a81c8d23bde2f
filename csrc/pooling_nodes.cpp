// Max and average pooling as C++ autograd nodes (see autograd.h): the same kernels as the
// Python Functions of pyops/ops/pooling.py, without their per-call cost. A pooling
// layer's kernels take tens of microseconds; Function.apply, the Python graph node and
// the backward's own Function took as long again (4x2048x7x7 global average pool:
// kernels 44 us forward + backward, the call 125 us).
//
// A node's backward returns one gradient per forward argument (undefined for the
// non-tensor ones).
//
// As in Python, the backwards are linear in the output gradient and differentiate to any
// order: average pooling's input gradient has average pooling (same windows, same
// divisors) as its gradient, and max pooling's reads the incoming gradient at each
// window's argmax (a gather by the saved indices).
#include <torch/csrc/autograd/custom_function.h>

#include <tuple>
#include <utility>

#include "autograd.h"
#include "pooling.h"

namespace pyops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A pooling call's geometry as the nodes keep it. dilation is (1, 1) for average pooling;
// count_include_pad and divisor_override are average pooling's.
struct PoolConf {
  std::vector<int64_t> kernel, stride, padding, dilation;
  bool channels_last;
  bool count_include_pad = true;
  int64_t divisor_override = 0;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override;
  }
  static PoolConf load(AutogradContext* ctx) {
    return {ctx->saved_data["kernel"].toIntVector(),         ctx->saved_data["stride"].toIntVector(),
            ctx->saved_data["padding"].toIntVector(),        ctx->saved_data["dilation"].toIntVector(),
            ctx->saved_data["channels_last"].toBool(),       ctx->saved_data["count_include_pad"].toBool(),
            ctx->saved_data["divisor_override"].toInt()};
  }
  at::MemoryFormat format() const { return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
  at::Tensor empty(at::IntArrayRef sizes, const at::Tensor& like, at::ScalarType dtype) const {
    return at::empty(sizes, like.options().dtype(dtype).memory_format(format()));
  }
  // A gradient in the layout the kernels were given (a copy only when it is not: an
  // expanded or strided incoming gradient).
  at::Tensor dense(const at::Tensor& g) const { return g.contiguous(format()); }
};

std::vector<int64_t> pooled_sizes(const at::Tensor& x, const std::vector<int64_t>& out_hw) {
  return {x.size(0), x.size(1), out_hw[0], out_hw[1]};
}

std::tuple<at::Tensor, at::Tensor> max_forward(const at::Tensor& x, const PoolConf& c,
                                               const std::vector<int64_t>& out_hw) {
  TORCH_CHECK(x.dim() == 4 && out_hw.size() == 2, "max_pool2d: 4-D input expected");
  const std::vector<int64_t> sizes = pooled_sizes(x, out_hw);
  at::Tensor y = c.empty(sizes, x, x.scalar_type()), idx = c.empty(sizes, x, at::kLong);
  if (y.numel() > 0) max_pool2d_forward(x, y, idx, c.kernel, c.stride, c.padding, c.dilation);
  return {y, idx};
}

at::Tensor avg_forward(const at::Tensor& x, const PoolConf& c, const std::vector<int64_t>& out_hw) {
  TORCH_CHECK(x.dim() == 4 && out_hw.size() == 2, "avg_pool2d: 4-D input expected");
  at::Tensor y = c.empty(pooled_sizes(x, out_hw), x, x.scalar_type());
  if (y.numel() > 0) avg_pool2d_forward(x, y, c.kernel, c.stride, c.padding, c.count_include_pad, c.divisor_override);
  return y;
}

at::Tensor avg_backward(const at::Tensor& g, const PoolConf& c, at::IntArrayRef input_size) {
  at::Tensor dx = c.empty(input_size, g, g.scalar_type());
  if (dx.numel() > 0)
    avg_pool2d_backward(c.dense(g), dx, c.kernel, c.stride, c.padding, c.count_include_pad, c.divisor_override);
  return dx;
}

at::Tensor max_backward(const at::Tensor& g, const at::Tensor& indices, const PoolConf& c,
                        at::IntArrayRef input_size) {
  at::Tensor dx = c.empty(input_size, g, g.scalar_type());
  if (dx.numel() > 0) max_pool2d_backward(c.dense(g), indices, dx, c.kernel, c.stride, c.padding, c.dilation);
  return dx;
}

// Average pooling's input gradient as a function of the output gradient (AvgPoolNode's
// backward under create_graph); its gradient is average pooling again.
struct AvgPoolGradNode : public torch::autograd::Function<AvgPoolGradNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, std::vector<int64_t> input_size,
                            const PoolConf& conf);
  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

struct AvgPoolNode : public torch::autograd::Function<AvgPoolNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const PoolConf& conf,
                            std::vector<int64_t> out_hw) {
    conf.save(ctx);
    ctx->saved_data["input_size"] = x.sizes().vec();
    return avg_forward(x, conf, out_hw);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const PoolConf c = PoolConf::load(ctx);
    const std::vector<int64_t> input_size = ctx->saved_data["input_size"].toIntVector();
    if (at::GradMode::is_enabled()) return {AvgPoolGradNode::apply(grads[0], input_size, c), {}, {}};
    return {avg_backward(grads[0], c, input_size), {}, {}};
  }
};

at::Tensor AvgPoolGradNode::forward(AutogradContext* ctx, const at::Tensor& g, std::vector<int64_t> input_size,
                                    const PoolConf& conf) {
  conf.save(ctx);
  ctx->saved_data["out_hw"] = hw_of(g);
  return avg_backward(g, conf, input_size);
}

variable_list AvgPoolGradNode::backward(AutogradContext* ctx, variable_list grads) {
  const PoolConf c = PoolConf::load(ctx);
  // the adjoint of the input gradient: the same windows and divisors (output in the layout
  // the forward's output had)
  return {AvgPoolNode::apply(grads[0], c, ctx->saved_data["out_hw"].toIntVector()), {}, {}};
}

// Max pooling's input gradient as a function of the output gradient (MaxPoolNode's
// backward under create_graph): its gradient reads the incoming gradient at each
// window's argmax, a gather that autograd differentiates further itself.
struct MaxPoolGradNode : public torch::autograd::Function<MaxPoolGradNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& indices,
                            std::vector<int64_t> input_size, const PoolConf& conf) {
    ctx->save_for_backward({indices});
    return max_backward(g, indices, conf, input_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor indices = ctx->get_saved_variables()[0];
    const at::Tensor& gg = grads[0];
    const at::Tensor picked = gg.reshape({gg.size(0), gg.size(1), -1})
                                  .gather(2, indices.reshape({indices.size(0), indices.size(1), -1}));
    return {picked.view(indices.sizes()), {}, {}, {}};
  }
};

// (output, indices); the indices are not differentiable and, when only they are used,
// the backward has nothing to do (no zero-filled gradient is made for them).
struct MaxPoolNode : public torch::autograd::Function<MaxPoolNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const PoolConf& conf,
                               std::vector<int64_t> out_hw) {
    at::Tensor y, idx;
    std::tie(y, idx) = max_forward(x, conf, out_hw);
    ctx->mark_non_differentiable({idx});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({idx});
    conf.save(ctx);
    ctx->saved_data["input_size"] = x.sizes().vec();
    return {y, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {{}, {}, {}};  // only the indices were used
    const at::Tensor indices = ctx->get_saved_variables()[0];
    const PoolConf c = PoolConf::load(ctx);
    const std::vector<int64_t> input_size = ctx->saved_data["input_size"].toIntVector();
    if (at::GradMode::is_enabled()) return {MaxPoolGradNode::apply(grads[0], indices, input_size, c), {}, {}};
    return {max_backward(grads[0], indices, c, input_size), {}, {}};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& x, std::vector<int64_t> kernel,
                                                       std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                       std::vector<int64_t> dilation, std::vector<int64_t> out_hw,
                                                       bool channels_last) {
  const PoolConf conf{std::move(kernel), std::move(stride), std::move(padding), std::move(dilation), channels_last};
  if (!records_node(x)) return max_forward(x, conf, out_hw);
  const variable_list out = MaxPoolNode::apply(x, conf, std::move(out_hw));
  return {out[0], out[1]};
}

at::Tensor avg_pool2d_autograd(const at::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> out_hw, bool count_include_pad,
                               int64_t divisor_override, bool channels_last) {
  const PoolConf conf{std::move(kernel), std::move(stride), std::move(padding), {1, 1}, channels_last,
                      count_include_pad, divisor_override};
  if (!records_node(x)) return avg_forward(x, conf, out_hw);
  return AvgPoolNode::apply(x, conf, std::move(out_hw));
}

}  // namespace pyops
