// CUDA kernels of the resnet_fused ops; registered in register_cuda.cpp. The .cu files include only
// light headers (see ENV.md: the full torch headers cost minutes of nvcc time per file).
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

#include "bn_act_plan.h"

namespace resnet_fused::cuda {

// out = act(x + residual); all three contiguous in one memory format, same dtype and device.
void add_act_launch(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out, bool relu);

// bn_act's passes (bn_act.cu). `reduce` partitions the statistics pass and sizes its partials,
// `elementwise` the normalization pass (bn::make_plan). x, residual (undefined: none) and out are
// contiguous in the plans' layout; weight, bias and the running statistics contiguous, in one dtype (x's,
// or float32 for a float16/bfloat16 x); save_mean/save_invstd in the accumulation type; workspace holds
// bn::forward_workspace_size(reduce, training) elements of the accumulation type. Writes the outputs,
// never the inputs.
void bn_act_forward_launch(const bn::TilePlan& reduce, const bn::TilePlan& elementwise, const at::Tensor& x,
                           const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& running_mean, const at::Tensor& running_var, bool training,
                           double momentum, double eps, bool relu, const at::Tensor& out,
                           const at::Tensor& save_mean, const at::Tensor& save_invstd,
                           const at::Tensor& new_running_mean, const at::Tensor& new_running_var,
                           const at::Tensor& workspace);

// bn_act_backward's passes, planned the same way: grad_out, out and x contiguous in the plans' layout,
// save_mean/save_invstd in the accumulation type, workspace of bn::backward_workspace_size(reduce) elements.
void bn_act_backward_launch(const bn::TilePlan& reduce, const bn::TilePlan& elementwise,
                            const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                            bool training, bool relu, const at::Tensor& grad_x, const at::Tensor& grad_weight,
                            const at::Tensor& grad_bias, const at::Tensor& grad_pre, const at::Tensor& workspace);

// conv_bn_act (conv/conv_dispatch.cpp): checks, NHWC operands, the kernel table, the launch.
at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool relu);
// Test and benchmark hooks: conv_bn_act on a named kernel ("cutlass_sm90", "mma_sm80", "direct"; an error
// names why it cannot take the call), and the kernel conv_bn_act would pick.
at::Tensor conv_bn_act_with_kernel(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, bool relu, c10::string_view kernel);
std::string conv_kernel_for(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace resnet_fused::cuda
