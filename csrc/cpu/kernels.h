// CPU kernels of the resnet_fused ops; registered in register_cpu.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace resnet_fused::cpu {

at::Tensor conv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu);

void conv_bn_act_into_residual(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::Tensor& residual,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu);

at::Tensor conv_bn_act_chain(const at::Tensor& x, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef geometry,
                             const std::optional<at::Tensor>& residual, bool relu);
void conv_bn_act_chain_into_residual(const at::Tensor& x, at::TensorList weights,
                                     const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef geometry,
                                     at::Tensor& residual, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, bool training, double momentum, double eps, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, bool relu, bool need_grad_pre);

at::Tensor add_act(const at::Tensor& x, const at::Tensor& residual, bool relu);

at::Tensor scale_add_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& residual, bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_add_act_backward(const at::Tensor& grad_out,
                                                                      const at::Tensor& out, const at::Tensor& x,
                                                                      const at::Tensor& scale, bool relu);

at::Tensor max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu);

at::Tensor bn_add_relu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                       const std::optional<at::Tensor>& residual_shift);

}  // namespace resnet_fused::cpu
