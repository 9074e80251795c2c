// max_pool2d on the CPU without indices. ATen's CPU max pool computes and writes the int64 argmax of every output
// even when nothing reads it (at::max_pool2d returns the values of max_pool2d_with_indices): for ResNet-50's stem
// pool over 8x64x112x112 channels_last that is 1.5 ms in float32 and 2.7 ms in bfloat16, where a pool without them
// took 0.8 and 0.65 ms (Inductor's, the same shapes, this machine). channels_last float inputs run the vectorized
// loop below; any other layout or dtype runs ATen's max pool (same values, same errors).
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/Pool.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d.h>

#include "kernels.h"
#include "loops.h"

namespace resnet_fused::cpu {
namespace {

// The input indices of output index `o`'s window along one dimension that lie inside the input (size `size`):
// from `begin` to before `end`, in steps of the dilation.
struct Span {
  int64_t begin, end;
};
Span window_span(int64_t o, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation, int64_t size) {
  const int64_t first = o * stride - padding;
  const int64_t begin = first < 0 ? first + (-first + dilation - 1) / dilation * dilation : first;
  return {begin, std::min(first + (kernel - 1) * dilation + 1, size)};
}

// One output row (n, oh) of an NHWC max pool: for each output pixel, the maximum over the window's rows `rows`
// and columns of every channel, `kWidth` channels at a time in the accumulation type (max is exact in it). NaN
// wins, as in ATen's kernel (at::vec::maximum propagates it); a window with no element in the input (none exists
// under pool2d_shape_check's padding rule) would give -inf, as ATen's does.
template <typename scalar_t>
void pool_row(const scalar_t* in, scalar_t* out, int64_t channels, int64_t width, int64_t out_width, Span rows,
              int64_t dilation_h, int64_t kernel_w, int64_t stride_w, int64_t padding_w, int64_t dilation_w) {
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  constexpr int64_t kWidth = IO::kWidth;
  for (int64_t ow = 0; ow < out_width; ++ow) {
    const Span columns = window_span(ow, kernel_w, stride_w, padding_w, dilation_w, width);
    scalar_t* out_pixel = out + ow * channels;
    for (int64_t c = 0; c < channels; c += kWidth) {
      const int64_t count = std::min(kWidth, channels - c);
      typename IO::Pack best;
      best.fill(Acc(-std::numeric_limits<at::opmath_type<scalar_t>>::infinity()));
      for (int64_t ih = rows.begin; ih < rows.end; ih += dilation_h) {
        const scalar_t* in_row = in + ih * width * channels + c;
        for (int64_t iw = columns.begin; iw < columns.end; iw += dilation_w) {
          const auto v = IO::load(in_row + iw * channels, count);
          for (int part = 0; part < IO::kParts; ++part) {
            best[part] = at::vec::maximum(best[part], v[part]);
          }
        }
      }
      IO::store(out_pixel + c, best, count);
    }
  }
}

}  // namespace

at::Tensor max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  // The layout rule of ATen's kernel, so that the output's strides are the same as ATen's.
  const bool channels_last = x.dim() == 4 && x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (!channels_last || !at::isFloatingType(x.scalar_type())) {
    return at::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
  }
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "max_pool2d: kernel_size, stride, padding and dilation must be pairs");
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t kernel_h = kernel_size[0], kernel_w = kernel_size[1];
  const int64_t out_height = at::native::pooling_output_shape<int64_t>(height, kernel_h, padding[0], stride[0],
                                                                       dilation[0], ceil_mode);
  const int64_t out_width = at::native::pooling_output_shape<int64_t>(width, kernel_w, padding[1], stride[1],
                                                                      dilation[1], ceil_mode);
  at::native::pool2d_shape_check(x, kernel_h, kernel_w, stride[0], stride[1], padding[0], padding[1], dilation[0],
                                 dilation[1], channels, height, width, out_height, out_width,
                                 at::MemoryFormat::ChannelsLast);
  const at::Tensor in = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({x.size(0), channels, out_height, out_width},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t rows = x.size(0) * out_height;
  // Tasks of whole output rows, about kGrainSize window loads each.
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, out_width * channels * kernel_h));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cpu", [&] {
    const scalar_t* in_data = in.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / out_height, oh = row % out_height;
        pool_row(in_data + n * height * width * channels, out_data + row * out_width * channels, channels, width,
                 out_width, window_span(oh, kernel_h, stride[0], padding[0], dilation[0], height), dilation[0],
                 kernel_w, stride[1], padding[1], dilation[1]);
      }
    });
  });
  return out;
}

}  // namespace resnet_fused::cpu
