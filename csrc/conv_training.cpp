// conv2d(x, weight) without bias for the cpu backend's training paths (resnet_fused/ops/conv_bn_act.py:
// plain_conv), with its autograd node in C++: ATen's convolution, whose backward takes the weight gradient of a
// 1x1 convolution over a small plane as one matmul (conv_weight_grad.h). The backward is ATen ops, so it records
// itself under create_graph: twice differentiable, as F.conv2d is.
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "conv_weight_grad.h"
#include "layout.h"

namespace resnet_fused::conv_training {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
};

class Conv : public torch::autograd::Function<Conv> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Geometry& geometry) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["stride"] = geometry.stride;
    ctx->saved_data["padding"] = geometry.padding;
    ctx->saved_data["dilation"] = geometry.dilation;
    ctx->saved_data["groups"] = geometry.groups;
    return {at::conv2d(x, weight, {}, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
                .contiguous(output_memory_format(x))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight] = autograd_node::conv_backward(
        grads[0], saved[0], saved[1], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["groups"].toInt(), ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return {grad_x, grad_weight, Tensor()};
  }
};

Tensor conv_training(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  return Conv::apply(x, weight, Geometry{stride.vec(), padding.vec(), dilation.vec(), groups})[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) {
  m.impl("conv_training", &conv_training);
}

}  // namespace resnet_fused::conv_training
