// The weight gradient of a training-mode convolution, for the C++ autograd nodes (conv_training.cpp,
// recomputed_bn_relu.cpp).
#pragma once

#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace resnet_fused::autograd_node {

// Output planes of at most this many pixels take the matmul below for a 1x1 convolution's weight gradient.
// Measured on the CPU (2 threads, float32, channels_last, batch 8; oneDNN through ATen against torch.mm, best of
// 15 rounds): on 4x4 planes (ResNet-50's layer4 at 112 px) 1024->2048 13.1 -> 3.2 ms (9.0 -> 3.3 with stride 2
// from 7x7), 2048->512 4.0 -> 2.1, 512->2048 1.8 -> 1.5; on 7x7 to 28x28 planes the two were level or ATen's
// faster (256->1024 on 7x7 1.17 against 1.18 ms; 64->256 on 28x28 1.17 against 1.35).
constexpr int64_t kMatmulWeightGradMaxPlane = 16;

// Whether the weight gradient of conv2d(x, weight, stride, padding, dilation, groups) giving grad_out is the
// matmul grad_out^T x: a 1x1 kernel without padding, dilation or groups, channels_last activations, a small plane.
inline bool weight_grad_is_matmul(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return weight.size(2) == 1 && weight.size(3) == 1 && groups == 1 && padding[0] == 0 && padding[1] == 0 &&
         dilation[0] == 1 && dilation[1] == 1 && grad_out.size(2) * grad_out.size(3) <= kMatmulWeightGradMaxPlane &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.dim() == 4;
}

// (grad_x, grad_weight) of conv2d(x, weight), each only if asked for. ATen's channels_last backward hands the
// weight gradient back through a dense copy and a second, channels_last one (mkldnn_convolution_backward_weights);
// for the 1x1 convolutions above one matmul over the (N*H*W, C) views computes it, in weight's layout (a 1x1
// weight has one).
inline std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, bool need_x, bool need_weight) {
  const bool matmul = need_weight && weight_grad_is_matmul(grad_out, x, weight, padding, dilation, groups);
  at::Tensor grad_x, grad_weight;
  if (need_x || (need_weight && !matmul)) {
    std::tie(grad_x, grad_weight, std::ignore) = at::convolution_backward(
        grad_out, x, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups,
        {need_x, need_weight && !matmul, false});
  }
  if (matmul) {
    const int64_t c_out = weight.size(0), c_in = weight.size(1);
    const at::Tensor sampled = x.slice(2, 0, x.size(2), stride[0]).slice(3, 0, x.size(3), stride[1]);
    const at::Tensor rows = grad_out.permute({0, 2, 3, 1}).reshape({-1, c_out});  // (N*H*W, C_out)
    const at::Tensor inputs = sampled.permute({0, 2, 3, 1}).reshape({-1, c_in});  // (N*H*W, C_in)
    grad_weight = at::mm(rows.t(), inputs).view({c_out, c_in, 1, 1});
  }
  return {grad_x, grad_weight};
}

}  // namespace resnet_fused::autograd_node
