// Memory-format rules shared by every backend: one place decides the layout of an op's output.
#pragma once

#include <ATen/core/Tensor.h>

namespace resnet_fused {

// Outputs are channels_last when the input is channels_last-contiguous (and not also NCHW-contiguous,
// as happens when C == 1 or H == W == 1), NCHW-contiguous otherwise. An empty tensor counts as
// NCHW-contiguous whatever its strides, so for it the channels_last test alone decides. The fake kernels in
// resnet_fused/ops/_layout.py apply the same rule, so compiled graphs see the strides eager produces.
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !(x.is_contiguous() && x.numel() > 0)
      ? at::MemoryFormat::ChannelsLast
      : at::MemoryFormat::Contiguous;
}

// A 4-D tensor that is contiguous in `format`, seen as N x C x S (S = H * W) with element strides,
// so one loop body serves NCHW (S innermost) and NHWC (C innermost).
struct ChannelView {
  int64_t n, c, s;
  int64_t stride_n, stride_c, stride_s;

  static ChannelView of(const at::Tensor& t, at::MemoryFormat format) {
    const int64_t n = t.size(0), c = t.size(1), s = t.size(2) * t.size(3);
    if (format == at::MemoryFormat::ChannelsLast) {
      return {n, c, s, s * c, 1, c};
    }
    return {n, c, s, c * s, s, 1};
  }
  bool channels_last() const { return stride_c == 1 && c > 1; }
  int64_t offset(int64_t in, int64_t ic, int64_t is) const {
    return in * stride_n + ic * stride_c + is * stride_s;
  }
};

}  // namespace resnet_fused
