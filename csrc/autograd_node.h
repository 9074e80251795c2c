// What the C++ autograd nodes of the eager training paths share (bn_act_autograd.cpp, recomputed_bn_relu.cpp):
// the bn_act ops through the dispatcher, the edge numbering of optional inputs, and the error a second
// derivative raises.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>

namespace resnet_fused::autograd_node {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BNActResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using BNActBackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// resnet_fused::bn_act and bn_act_backward through the dispatcher, to the tensors' backend kernel. Callers run
// them below the autograd keys: the Python autograd formulas registered for the ops must not run here.
inline BNActResult bn_act(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          const std::optional<Tensor>& residual, const Tensor& running_mean,
                          const Tensor& running_var, bool training, double momentum, double eps, bool relu) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("resnet_fused::bn_act", "").typed<
      BNActResult(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                  const Tensor&, bool, double, double, bool)>();
  return op.call(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu);
}

inline BNActBackwardResult bn_act_backward(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                                           const Tensor& weight, const Tensor& mean, const Tensor& invstd,
                                           bool training, bool relu, bool need_grad_pre) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("resnet_fused::bn_act_backward", "").typed<
      BNActBackwardResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          bool, bool, bool)>();
  return op.call(grad_out, out, x, weight, mean, invstd, training, relu, need_grad_pre);
}

// x itself when contiguous in either format, else a copy in the format its strides resemble (_layout.dense).
inline Tensor dense(const Tensor& x) {
  if (x.dim() != 4 || x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return x;
  }
  const bool channels_innermost = x.stride(1) == *std::min_element(x.strides().begin(), x.strides().end());
  return x.contiguous(channels_innermost ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// A custom Function numbers the tensor arguments that are present only (ctx->needs_input_grad): each argument's
// number among them, or -1 for an absent one. Kept in ctx->saved_data["edges"] by the forward.
inline std::vector<int64_t> edge_numbers(std::initializer_list<bool> present) {
  std::vector<int64_t> edges;
  int64_t next = 0;
  for (const bool given : present) {
    edges.push_back(given ? next++ : -1);
  }
  return edges;
}

// Whether the backward must compute the gradient of tensor argument `i` (see edge_numbers).
inline bool needs_grad(AutogradContext* ctx, const std::vector<int64_t>& edges, size_t i) {
  return edges[i] >= 0 && ctx->needs_input_grad(edges[i]);
}

// A node that raises NotImplementedError when a second derivative reaches it.
struct DoubleBackwardError : public torch::autograd::Node {
  DoubleBackwardError(std::string what, torch::autograd::edge_list&& next_edges)
      : Node(std::move(next_edges)), what(std::move(what)) {}
  variable_list apply(variable_list&& /*grads*/) override {
    TORCH_CHECK_NOT_IMPLEMENTED(false, what, ": double backward (a gradient of the gradient) is not supported");
  }
  std::string what;
};

// For a backward run with create_graph=True: ties its results to a DoubleBackwardError through the incoming
// gradients and saved tensors that require grad. The backward saves the batch statistics as constants, so a
// derivative of it would silently miss terms (resnet_fused/ops/_no_double_backward.py does the same in Python).
inline void raise_when_differentiated(const std::string& what, variable_list& results, const variable_list& grads,
                                      const variable_list& saved) {
  variable_list anchors;
  for (const auto* list : {&grads, &saved}) {
    for (const auto& t : *list) {
      if (t.defined() && t.requires_grad()) {
        anchors.push_back(t);
      }
    }
  }
  if (anchors.empty()) {
    return;
  }
  const auto node = std::make_shared<DoubleBackwardError>(what, torch::autograd::collect_next_edges(anchors));
  for (auto& result : results) {
    if (result.defined()) {
      result = result.detach();
      torch::autograd::set_history(result, node);
    }
  }
}

// A backward's last step: drops the gradients of the tensor arguments that need none (numbered as edge_numbers
// numbers them; they come first in `results`) and, with create_graph (grad mode on in the backward), ties the
// rest to a DoubleBackwardError.
inline void finish_backward(const std::string& what, AutogradContext* ctx, const std::vector<int64_t>& edges,
                            bool create_graph, variable_list& results, const variable_list& grads,
                            const variable_list& saved) {
  for (size_t i = 0; i < edges.size(); ++i) {
    if (!needs_grad(ctx, edges, i)) {
      results[i] = Tensor();
    }
  }
  if (create_graph) {
    raise_when_differentiated(what, results, grads, saved);
  }
}

}  // namespace resnet_fused::autograd_node
