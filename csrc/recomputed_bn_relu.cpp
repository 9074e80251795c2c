// The recomputing training ops of resnet_fused/ops/recomputed_bn_relu.py (BN + ReLU run inside the op that
// follows it, keeping the BN input rather than the ReLU output for the backward, which recomputes it), with
// their autograd node in C++, for the cpu backend. The Python autograd.Function that computes the same costs
// about 60 us a call forward and 80 backward in its own Python (measured on a Bottleneck, README "The training
// step"), several times that once a convolution has swept the caches; ResNet-50 makes about 35 such calls a
// training step. Eager only: the Python callers take these ops outside torch.compile and torch.export, so they
// have no fake kernels. The BN kernels are reached through the dispatcher, so this file needs no backend.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "autograd_node.h"
#include "conv_weight_grad.h"
#include "layout.h"

namespace resnet_fused::training {
namespace {

using at::Tensor;
using autograd_node::AutogradContext;
using autograd_node::bn_act;
using autograd_node::bn_act_backward;
using autograd_node::BNActResult;
using autograd_node::dense;
using autograd_node::edge_numbers;
using autograd_node::finish_backward;
using autograd_node::needs_grad;
using autograd_node::variable_list;

Tensor bn_add_relu(const Tensor& y, const Tensor& scale, const Tensor& shift) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("resnet_fused::bn_add_relu", "").typed<
      Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
             const std::optional<Tensor>&)>();
  return op.call(y, scale, shift, std::nullopt, std::nullopt, std::nullopt);
}

// A training-mode BN: its running statistics (scratch ones when it keeps none: the kernels take them) and
// whether they are the module's, to be updated.
struct BatchNorm {
  Tensor running_mean, running_var;
  bool tracked = false;
  double momentum = 0.0, eps = 0.0;

  // (out, mean, invstd, new running mean, new running var) of act(batch_norm(x) + residual).
  BNActResult forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const std::optional<Tensor>& residual,
                      bool relu) const {
    TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) != 1,
                      "Expected more than 1 value per channel when training, got input size ", x.sizes());
    return bn_act(x, weight, bias, residual, running_mean, running_var, /*training=*/true, momentum, eps, relu);
  }
};

BatchNorm batch_norm(const Tensor& like_weight, const std::optional<Tensor>& running_mean,
                     const std::optional<Tensor>& running_var, double momentum, double eps) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    return {*running_mean, *running_var, true, momentum, eps};
  }
  return {at::zeros_like(like_weight), at::ones_like(like_weight), false, momentum, eps};
}

// (weight, bias) of a BN over `channels` channels of x's dtype, ones and zeros standing in for a BN without affine
// parameters, in the parameters' dtype (the running statistics', else float32, float64 for a float64 x): the
// kernels take both.
std::pair<Tensor, Tensor> affine(const Tensor& x, int64_t channels, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean) {
  if (weight.has_value() && bias.has_value()) {
    return {*weight, *bias};
  }
  const std::optional<Tensor>& like = weight.has_value() ? weight : bias.has_value() ? bias : running_mean;
  const auto dtype = like.has_value() ? like->scalar_type()
                                      : x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = x.options().dtype(dtype);
  return {weight.has_value() ? *weight : at::ones({channels}, options),
          bias.has_value() ? *bias : at::zeros({channels}, options)};
}

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;

  // conv2d(y, weight), no bias, in y's memory format (plain_conv on the cpu backend: ATen's convolution).
  Tensor forward(const Tensor& y, const Tensor& weight) const {
    return at::conv2d(y, weight, {}, stride, padding, dilation, groups).contiguous(output_memory_format(y));
  }

  std::pair<Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& y, const Tensor& weight, bool need_y,
                                     bool need_weight) const {
    return autograd_node::conv_backward(grad_out, y, weight, stride, padding, dilation, groups, need_y, need_weight);
  }
};

struct PoolArgs {
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  bool ceil_mode = false;
};

// max_pool2d without indices (csrc/cpu/max_pool.cpp): the backward recomputes the argmax.
Tensor max_pool2d(const Tensor& y, const PoolArgs& pool) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("resnet_fused::max_pool2d", "").typed<
      Tensor(const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool)>();
  return op.call(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode);
}

// The op after the ReLU.
enum class NextKind { conv, max_pool, conv_bn_act };

struct Next {
  NextKind kind = NextKind::conv;
  ConvArgs conv;  // conv, conv_bn_act
  PoolArgs pool;  // max_pool
  BatchNorm bn2;  // conv_bn_act: the second BN, act(bn2(conv(y)) + residual)
  bool relu = true;
  bool recompute = false;  // conv_bn_act: recompute the conv output in the backward instead of keeping it
};

// Positions of the differentiable inputs of RecomputedBNReLU::forward, its tensor arguments (the ones a kind of
// Next does not use are absent).
enum Input : size_t { kX, kWeight, kBias, kConvWeight, kWeight2, kBias2, kResidual, kNumTensorInputs };
using OptionalTensor = std::optional<Tensor>;

// then(relu(batch_norm(x))) in training; outputs (out, new running mean and var of the BN[, of the second BN]).
class RecomputedBNReLU : public torch::autograd::Function<RecomputedBNReLU> {
 public:
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias,
                               const OptionalTensor& conv_weight_arg, const OptionalTensor& weight2_arg,
                               const OptionalTensor& bias2_arg, const OptionalTensor& residual, BatchNorm bn,
                               Next next) {
    const auto edges = edge_numbers({true, true, true, conv_weight_arg.has_value(), weight2_arg.has_value(),
                                     bias2_arg.has_value(), residual.has_value()});
    const Tensor conv_weight = conv_weight_arg.value_or(Tensor()), weight2 = weight2_arg.value_or(Tensor()),
                 bias2 = bias2_arg.value_or(Tensor());
    // apply() turns grad mode off only: skip the autograd keys, and so the ops' Python autograd wrappers (about
    // 8 us a call). Nothing here writes to a tensor the caller holds, whose version counter this would not bump.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    x = dense(x);
    auto [y, mean, invstd, new_mean, new_var] = bn.forward(x, weight, bias, std::nullopt, /*relu=*/true);
    variable_list outputs;
    Tensor out, kept_out, mean2, invstd2, kept_z;
    switch (next.kind) {
      case NextKind::conv:
        out = next.conv.forward(y, conv_weight);
        outputs = {out, new_mean, new_var};
        break;
      case NextKind::max_pool:
        out = max_pool2d(y, next.pool);
        outputs = {out, new_mean, new_var};
        break;
      case NextKind::conv_bn_act: {
        Tensor z = next.conv.forward(y, conv_weight);
        std::optional<Tensor> dense_residual;
        if (residual.has_value()) {
          dense_residual = dense(*residual);
        }
        Tensor new_mean2, new_var2;
        std::tie(out, mean2, invstd2, new_mean2, new_var2) = next.bn2.forward(z, weight2, bias2, dense_residual,
                                                                              next.relu);
        kept_out = next.relu ? out : Tensor();  // ReLU's mask
        kept_z = next.recompute ? Tensor() : z;
        outputs = {out, new_mean, new_var, new_mean2, new_var2};
        break;
      }
    }
    // Not the running statistics: later forwards update them in place before this backward may run.
    ctx->save_for_backward({x, weight, bias, mean, invstd, conv_weight, weight2, kept_out, mean2, invstd2, kept_z});
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["kind"] = static_cast<int64_t>(next.kind);
    ctx->saved_data["stride"] = next.conv.stride;
    ctx->saved_data["padding"] = next.conv.padding;
    ctx->saved_data["dilation"] = next.conv.dilation;
    ctx->saved_data["groups"] = next.conv.groups;
    ctx->saved_data["pool_kernel_size"] = next.pool.kernel_size;
    ctx->saved_data["pool_stride"] = next.pool.stride;
    ctx->saved_data["pool_padding"] = next.pool.padding;
    ctx->saved_data["pool_dilation"] = next.pool.dilation;
    ctx->saved_data["pool_ceil_mode"] = next.pool.ceil_mode;
    ctx->saved_data["relu"] = next.relu;
    for (size_t i = 1; i < outputs.size(); ++i) {
      ctx->mark_non_differentiable({outputs[i]});
    }
    ctx->set_materialize_grads(false);  // only `out` carries a gradient
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list results(kNumTensorInputs + 2);  // the two non-tensor arguments get none
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) {
      return results;
    }
    const bool create_graph = at::GradMode::is_enabled();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4],
                 &conv_weight = saved[5], &weight2 = saved[6], &out = saved[7], &mean2 = saved[8],
                 &invstd2 = saved[9];
    Tensor z = saved[10];
    const auto kind = static_cast<NextKind>(ctx->saved_data["kind"].toInt());
    const ConvArgs conv{ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                        ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
    const auto edges = ctx->saved_data["edges"].toIntVector();
    auto need = [&](Input i) { return needs_grad(ctx, edges, i); };
    const bool need_bn = need(kX) || need(kWeight) || need(kBias);

    // Below the autograd keys: nothing here is recorded (see raise_when_differentiated), and the ops' Python
    // autograd wrappers are skipped.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // The ReLU output, recomputed from the saved batch statistics in one pass.
    const Tensor scale = weight.to(mean.scalar_type()) * invstd;
    const Tensor y = bn_add_relu(x, scale, bias.to(mean.scalar_type()) - mean * scale)
                         .contiguous(output_memory_format(x));
    Tensor grad_y;
    switch (kind) {
      case NextKind::conv:
        std::tie(grad_y, results[kConvWeight]) = conv.backward(grad_out, y, conv_weight, need_bn, need(kConvWeight));
        break;
      case NextKind::max_pool:
        if (need_bn) {
          const auto kernel_size = ctx->saved_data["pool_kernel_size"].toIntVector();
          const auto stride = ctx->saved_data["pool_stride"].toIntVector();
          const auto padding = ctx->saved_data["pool_padding"].toIntVector();
          const auto dilation = ctx->saved_data["pool_dilation"].toIntVector();
          const bool ceil_mode = ctx->saved_data["pool_ceil_mode"].toBool();
          // The argmax, recomputed with ATen's kernel (the forward's pool keeps none): the values are the forward's,
          // exactly, so only which of exactly tied elements gets the gradient is ATen's choice.
          const Tensor indices = std::get<1>(at::max_pool2d_with_indices(y, kernel_size, stride, padding, dilation,
                                                                         ceil_mode));
          grad_y = at::max_pool2d_with_indices_backward(grad_out, y, kernel_size, stride, padding, dilation,
                                                        ceil_mode, indices);
        }
        break;
      case NextKind::conv_bn_act: {
        const bool relu = ctx->saved_data["relu"].toBool();
        if (!z.defined()) {
          z = conv.forward(y, conv_weight);  // the conv output, recomputed
        }
        const bool need_z = need_bn || need(kConvWeight);
        if (need_z || need(kWeight2) || need(kBias2) || need(kResidual)) {
          // Without ReLU, the output is not read: z stands in for it.
          Tensor grad_z;
          std::tie(grad_z, results[kWeight2], results[kBias2], results[kResidual]) =
              bn_act_backward(grad_out, relu ? out : z, z, weight2, mean2, invstd2, /*training=*/true, relu,
                              need(kResidual) && relu);
          if (!relu && need(kResidual)) {
            results[kResidual] = grad_out;  // without ReLU, grad_out itself, as for an add
          }
          if (need_z) {
            std::tie(grad_y, results[kConvWeight]) = conv.backward(grad_z, y, conv_weight, need_bn,
                                                                   need(kConvWeight));
          }
        }
        break;
      }
    }
    if (need_bn) {
      std::tie(results[kX], results[kWeight], results[kBias], std::ignore) =
          bn_act_backward(grad_y, y, x, weight, mean, invstd, /*training=*/true, /*relu=*/true,
                          /*need_grad_pre=*/false);
    }
    finish_backward("recomputed BN + ReLU", ctx, edges, create_graph, results, grads, saved);
    return results;
  }
};

// Runs RecomputedBNReLU and copies the new running statistics into the modules' buffers (outside the node, so
// that the copies bump the buffers' version counters as any in-place write does: the fold cache reads them).
Tensor run(const Tensor& x, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
           const OptionalTensor& running_mean, const OptionalTensor& running_var, double momentum, double eps,
           const OptionalTensor& conv_weight, const OptionalTensor& weight2, const OptionalTensor& bias2,
           const OptionalTensor& residual, Next next) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got shape ", x.sizes());
  const auto [weight, bias] = affine(x, x.size(1), bn_weight, bn_bias, running_mean);
  const BatchNorm bn = batch_norm(weight, running_mean, running_var, momentum, eps);
  const auto outputs = RecomputedBNReLU::apply(x, weight, bias, conv_weight, weight2, bias2, residual, bn, next);
  at::NoGradGuard no_grad;
  if (bn.tracked) {
    bn.running_mean.copy_(outputs[1]);
    bn.running_var.copy_(outputs[2]);
  }
  if (next.kind == NextKind::conv_bn_act && next.bn2.tracked) {
    next.bn2.running_mean.copy_(outputs[3]);
    next.bn2.running_var.copy_(outputs[4]);
  }
  return outputs[0];
}

Tensor bn_relu_conv_training(const Tensor& x, const std::optional<Tensor>& bn_weight,
                             const std::optional<Tensor>& bn_bias, const std::optional<Tensor>& running_mean,
                             const std::optional<Tensor>& running_var, double momentum, double eps,
                             const Tensor& conv_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  Next next;
  next.conv = {stride.vec(), padding.vec(), dilation.vec(), groups};
  return run(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, conv_weight, std::nullopt,
             std::nullopt, std::nullopt, next);
}

Tensor bn_relu_max_pool_training(const Tensor& x, const std::optional<Tensor>& bn_weight,
                                 const std::optional<Tensor>& bn_bias, const std::optional<Tensor>& running_mean,
                                 const std::optional<Tensor>& running_var, double momentum, double eps,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, bool ceil_mode) {
  Next next;
  next.kind = NextKind::max_pool;
  next.pool = {kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), ceil_mode};
  return run(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, std::nullopt, std::nullopt,
             std::nullopt, std::nullopt, next);
}

Tensor bn_relu_conv_bn_act_training(
    const Tensor& x, const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, double momentum, double eps,
    const Tensor& conv_weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, const std::optional<Tensor>& bn2_weight, const std::optional<Tensor>& bn2_bias,
    const std::optional<Tensor>& bn2_running_mean, const std::optional<Tensor>& bn2_running_var,
    const std::optional<Tensor>& residual, double momentum2, double eps2, bool relu, bool recompute) {
  // The second BN normalizes the conv output: x's dtype, conv_weight's output channels.
  const auto [weight2, bias2] = affine(x, conv_weight.size(0), bn2_weight, bn2_bias, bn2_running_mean);
  Next next;
  next.kind = NextKind::conv_bn_act;
  next.conv = {stride.vec(), padding.vec(), dilation.vec(), groups};
  next.bn2 = batch_norm(weight2, bn2_running_mean, bn2_running_var, momentum2, eps2);
  next.relu = relu;
  next.recompute = recompute;
  return run(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, conv_weight, weight2, bias2,
             residual, next);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) {
  m.impl("bn_relu_conv_training", &bn_relu_conv_training);
  m.impl("bn_relu_max_pool_training", &bn_relu_max_pool_training);
  m.impl("bn_relu_conv_bn_act_training", &bn_relu_conv_bn_act_training);
}

}  // namespace resnet_fused::training
