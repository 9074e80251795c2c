// The weight gradient of a training-mode convolution, for the C++ autograd nodes (conv_training.cpp,
// recomputed_bn_relu.cpp).
#pragma once

#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

namespace resnet_fused::autograd_node {

// Output planes of at most this many pixels take the matmul below for the weight gradient. Measured on the CPU
// (2 threads, float32, channels_last, batch 8; oneDNN through ATen against the matmul, best of 15 rounds): 1x1
// on 4x4 planes (ResNet-50's layer4 at 112 px) 1024->2048 13.1 -> 3.2 ms (9.0 -> 3.3 with stride 2 from 7x7),
// 2048->512 4.0 -> 2.1, 512->2048 1.8 -> 1.5; on 7x7 to 28x28 planes the two were level or ATen's faster
// (256->1024 on 7x7 1.17 against 1.18 ms; 64->256 on 28x28 1.17 against 1.35). 3x3 512->512 (medians of 11,
// in two runs): on 4x4 8.3 -> 5.4 and 5.1 -> 4.3 ms, with stride 2 from 7x7 6.6 -> 5.6 and 5.7 -> 4.1, at batch
// 2 8.9 -> 3.9, at batch 32 17.7 -> 17.5; on 7x7 planes 256->256 2.9 against 3.9 (ATen's faster).
constexpr int64_t kMatmulWeightGradMaxPlane = 16;
// A larger kernel's matmul reads a patch matrix (N*H*W, KH*KW*C) copied from x; past this many values (16 MB in
// float32; ResNet-50's layer4 at batch 32 and 112 px has 2.4M) ATen's, which copies nothing of the input's size.
constexpr int64_t kMatmulWeightGradMaxPatches = int64_t{1} << 22;

// Whether the weight gradient of conv2d(x, weight, stride, padding, dilation, groups) giving grad_out is the
// matmul grad_out^T patches(x): no groups, channels_last activations, a small plane, and for kernels larger than
// 1x1 a patch matrix of bounded size.
inline bool weight_grad_is_matmul(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  int64_t groups) {
  if (groups != 1 || x.dim() != 4 || !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  const int64_t plane = grad_out.size(2) * grad_out.size(3), taps = weight.size(2) * weight.size(3);
  return plane <= kMatmulWeightGradMaxPlane &&
         (taps == 1 || grad_out.size(0) * plane * taps * x.size(1) <= kMatmulWeightGradMaxPatches);
}

// The (N*Ho*Wo, KH*KW*C) matrix whose row (n, ho, wo) holds the input values that output pixel reads, in (kh, kw,
// c) order (the order of a channels_last weight's values), zeros where the kernel covers padding. A strided view
// of x (or of a zero-padded channels_last copy), then one copy; a view where the rows already are x's (1x1,
// stride 1, no padding).
inline at::Tensor patches(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef out_plane,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t n = x.size(0), c = x.size(1);
  at::Tensor source = x;
  if (padding[0] != 0 || padding[1] != 0) {
    source = at::empty({n, c, x.size(2) + 2 * padding[0], x.size(3) + 2 * padding[1]}, x.options(),
                       at::MemoryFormat::ChannelsLast)
                 .zero_();
    source.slice(2, padding[0], padding[0] + x.size(2)).slice(3, padding[1], padding[1] + x.size(3)).copy_(x);
  }
  const int64_t row = source.stride(2), column = source.stride(3);
  return source
      .as_strided({n, out_plane[0], out_plane[1], kernel[0], kernel[1], c},
                  {source.stride(0), stride[0] * row, stride[1] * column, dilation[0] * row, dilation[1] * column,
                   source.stride(1)},
                  source.storage_offset())
      .reshape({-1, kernel[0] * kernel[1] * c});
}

// (grad_x, grad_weight) of conv2d(x, weight), each only if asked for. ATen's channels_last backward hands the
// weight gradient back through a dense copy and a second, channels_last one (mkldnn_convolution_backward_weights;
// that copy alone takes 2.6 ms for a 512x512x3x3 gradient here); for the convolutions above one matmul over the
// (N*H*W, C_out) view of grad_out and x's patches computes it, in the channels_last layout.
inline std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, bool need_x, bool need_weight) {
  const bool matmul = need_weight && weight_grad_is_matmul(grad_out, x, weight, groups);
  at::Tensor grad_x, grad_weight;
  if (need_x || (need_weight && !matmul)) {
    std::tie(grad_x, grad_weight, std::ignore) = at::convolution_backward(
        grad_out, x, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups,
        {need_x, need_weight && !matmul, false});
  }
  if (matmul) {
    const int64_t c_out = weight.size(0), c_in = weight.size(1), kh = weight.size(2), kw = weight.size(3);
    const at::Tensor rows = grad_out.permute({0, 2, 3, 1}).reshape({-1, c_out});  // (N*H*W, C_out)
    const at::Tensor inputs = patches(x, {kh, kw}, {grad_out.size(2), grad_out.size(3)}, stride, padding, dilation);
    grad_weight = at::mm(rows.t(), inputs).view({c_out, kh, kw, c_in}).permute({0, 3, 1, 2});
  }
  return {grad_x, grad_weight};
}

}  // namespace resnet_fused::autograd_node
