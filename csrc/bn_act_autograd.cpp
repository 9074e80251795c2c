// bn_act with its autograd node in C++, for eager callers: rf.bn_act on the backends whose kernels are C++ ops.
// The formulas are the ones resnet_fused/ops/bn_act.py registers for bn_act (which torch.compile and torch.export
// trace); a Python autograd.Function computing them costs about 45 us a forward + backward more than this
// (README, "bn_act without ReLU"), more once a convolution has swept the caches.
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
using autograd_node::BNActResult;
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

class BNAct : public torch::autograd::Function<BNAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const std::optional<Tensor>& residual, const Options& options) {
    ctx->saved_data["edges"] = edge_numbers({true, true, true, residual.has_value()});
    // apply() turns grad mode off only: skip the autograd keys, and so bn_act's Python autograd wrapper.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, save_mean, save_invstd, new_mean, new_var] =
        bn_act(x, weight, bias, residual, options.running_mean, options.running_var, options.training,
               options.momentum, options.eps, options.relu);
    // The output only for ReLU's mask: without ReLU (a downsample branch) keeping it would hold one more
    // activation until the backward, which the gradient kernels do not read.
    ctx->save_for_backward({x, weight, save_mean, save_invstd, options.relu ? out : Tensor()});
    ctx->saved_data["training"] = options.training;
    ctx->saved_data["relu"] = options.relu;
    ctx->mark_non_differentiable({save_mean, save_invstd, new_mean, new_var});
    ctx->set_materialize_grads(false);  // only `out` carries a gradient
    return {out, save_mean, save_invstd, new_mean, new_var};
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
                          ctx->saved_data["training"].toBool(), relu, need(kResidual));
    }
    finish_backward("bn_act", ctx, edges, create_graph, results, grads, saved);
    return results;
  }
};

// bn_act's schema and results; differentiable in x, weight, bias and residual.
BNActResult bn_act_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                            const std::optional<Tensor>& residual, const Tensor& running_mean,
                            const Tensor& running_var, bool training, double momentum, double eps, bool relu) {
  const auto outputs = BNAct::apply(x, weight, bias, residual,
                                    Options{running_mean, running_var, training, momentum, eps, relu});
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) {
  m.impl("bn_act_autograd", &bn_act_autograd);
}

}  // namespace resnet_fused::bn_act_autograd
