// Shared by the C++ autograd nodes (convolution, batch norm, pooling, sigmoid): what
// Python's torch.autograd.function.once_differentiable does for a Python Function, and
// when an entry records its node.
//
// The nodes exist for CPU calls in plain eager mode that need gradients: the same C++
// entries the Python Functions call through pyops' operators, without the Python
// Function's per-call cost (Function.apply, a Python graph node, the operator layer).
// The same entries serve plain-eager CPU calls without gradients, running the kernels
// directly. CUDA tensors, the Triton backend, tracing and dispatch modes keep the Python
// Functions.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <initializer_list>
#include <vector>

namespace pyops {

// Runs a backward body under no_grad; when the backward's own graph is being recorded
// (create_graph with gradients that require grad), its outputs then lead to an error
// node, so differentiating them again raises instead of giving a silently wrong (zero)
// second derivative.
template <typename Body>
torch::autograd::variable_list once_differentiable(const torch::autograd::variable_list& grads, const Body& body) {
  torch::autograd::variable_list outputs;
  {
    at::NoGradGuard no_grad;
    outputs = body();
  }
  if (!at::GradMode::is_enabled()) return outputs;
  bool recorded = false;
  for (const auto& g : grads) recorded = recorded || (g.defined() && g.requires_grad());
  if (!recorded) return outputs;
  torch::autograd::variable_list leaves;
  for (const auto& t : outputs) leaves.push_back(t.defined() ? t.detach().requires_grad_(true) : t);
  torch::autograd::DelayedError error(
      "trying to differentiate twice a function that was marked with @once_differentiable",
      static_cast<int64_t>(leaves.size()));
  return error.apply(std::move(leaves));
}

// needs_input_grad counts only the tensor arguments given: the index of an optional one.
inline int64_t given(const c10::optional<at::Tensor>& t) { return int64_t{t.has_value() && t->defined()}; }

// Whether a call on input x records a node: the C++ entries that also serve calls without
// gradients run their kernels directly otherwise (no node built, no geometry saved).
inline bool records_node(const at::Tensor& x) { return at::GradMode::is_enabled() && x.requires_grad(); }

// The same for a call with several differentiable inputs (undefined ones: absent arguments).
inline bool records_node(std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// (H, W) of an (N, C, H, W) tensor: the output size a node saves or passes to its gradient's node.
inline std::vector<int64_t> hw_of(const at::Tensor& t) { return {t.size(2), t.size(3)}; }

}  // namespace pyops
