// bn_act's eager path on the backends whose kernels are C++ ops (rf.bn_act calls it): the op, with its autograd
// node in C++ (the formulas resnet_fused/ops/bn_act.py registers for bn_act, which torch.compile and torch.export
// trace), and the running statistics' update. A Python autograd.Function computing the same costs about 45 us a
// forward + backward more (README, "bn_act without ReLU"), more once a convolution has swept the caches.
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "autograd_node.h"

namespace resnet_fused::bn_act_autograd {
namespace {

using at::Tensor;
using autograd_node::AutogradContext;
using autograd_node::bn_act;
using autograd_node::bn_act_backward;
using autograd_node::dense;
using autograd_node::edge_numbers;
using autograd_node::finish_backward;
using autograd_node::needs_grad;
using autograd_node::variable_list;

// The arguments that carry no gradient.
struct Options {
  Tensor running_mean, running_var;
  bool training;
  double momentum, eps;
  bool relu;
};

enum Input : size_t { kX, kWeight, kBias, kResidual, kNumTensorInputs };

// (x made dense, bn_act of it and of the residual made dense): the kernels take either memory format, densely. Below
// the autograd keys: apply() turns grad mode off only, and bn_act's Python autograd wrapper must not run.
std::pair<Tensor, autograd_node::BNActResult> dense_bn_act(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                           const std::optional<Tensor>& residual,
                                                           const Options& options) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensor dense_x = dense(x);
  std::optional<Tensor> dense_residual;
  if (residual.has_value()) {
    dense_residual = dense(*residual);
  }
  auto result = bn_act(dense_x, weight, bias, dense_residual, options.running_mean, options.running_var,
                       options.training, options.momentum, options.eps, options.relu);
  return {std::move(dense_x), std::move(result)};
}

class BNAct : public torch::autograd::Function<BNAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const std::optional<Tensor>& residual, const Options& options) {
    ctx->saved_data["edges"] = edge_numbers({true, true, true, residual.has_value()});
    auto [dense_x, result] = dense_bn_act(x, weight, bias, residual, options);
    auto& [out, save_mean, save_invstd, new_mean, new_var] = result;
    // The output only for ReLU's mask: without ReLU (a downsample branch) keeping it would hold one more
    // activation until the backward, which the gradient kernels do not read.
    ctx->save_for_backward({dense_x, weight, save_mean, save_invstd, options.relu ? out : Tensor()});
    ctx->saved_data["training"] = options.training;
    ctx->saved_data["relu"] = options.relu;
    ctx->mark_non_differentiable({new_mean, new_var});
    ctx->set_materialize_grads(false);  // only `out` carries a gradient
    return {out, new_mean, new_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list results(kNumTensorInputs + 1);  // the Options argument gets none
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) {
      return results;
    }
    const bool create_graph = at::GradMode::is_enabled();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &save_mean = saved[2], &save_invstd = saved[3], &out = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    auto need = [&](Input i) { return needs_grad(ctx, edges, i); };
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(results[kX], results[kWeight], results[kBias], results[kResidual]) =
          bn_act_backward(grad_out, relu ? out : x, x, weight, save_mean, save_invstd,
                          ctx->saved_data["training"].toBool(), relu, need(kResidual) && relu);
    }
    if (!relu && need(kResidual)) {
      results[kResidual] = grad_out;  // without ReLU the residual's gradient is grad_out itself, as for an add
    }
    finish_backward("bn_act", ctx, edges, create_graph, results, grads, saved);
    return results;
  }
};

// act(batch_norm(x) + residual), differentiable in x, weight, bias and residual; in training the running
// statistics, when given, updated in place (outside the node, so that the writes bump their version counters as
// any in-place write does: the fold cache reads them), from scratch ones otherwise.
Tensor bn_act_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias, const std::optional<Tensor>& residual,
                       const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                       bool training, double momentum, double eps, bool relu) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together");
  const bool tracked = running_mean.has_value();
  const Options options{tracked ? *running_mean : at::zeros_like(weight),
                        tracked ? *running_var : at::ones_like(weight), training, momentum, eps, relu};
  const bool records = at::GradMode::is_enabled() &&
                       (x.requires_grad() || weight.requires_grad() || bias.requires_grad() ||
                        (residual.has_value() && residual->requires_grad()));
  variable_list outputs;
  if (records) {
    outputs = BNAct::apply(x, weight, bias, residual, options);
  } else {
    // No gradient to record (inference, or under no_grad): the op alone, without the Function's context (saved
    // tensors, saved_data entries), which costs microseconds a call on a small tensor (README, "Autograd nodes in
    // C++").
    const auto result = dense_bn_act(x, weight, bias, residual, options).second;
    outputs = {std::get<0>(result), std::get<3>(result), std::get<4>(result)};
  }
  if (training && tracked) {
    at::NoGradGuard no_grad;
    running_mean->copy_(outputs[1]);
    running_var->copy_(outputs[2]);
  }
  return outputs[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) {
  m.impl("bn_act_autograd", &bn_act_autograd);
}

}  // namespace resnet_fused::bn_act_autograd
