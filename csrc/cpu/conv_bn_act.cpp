// conv_bn_act on the CPU: the convolution through ATen (oneDNN), then the whole epilogue
// (bias, residual add, ReLU) in one pass over the output, computed in the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/convolution.h>

#include "kernels.h"
#include "loops.h"

namespace resnet_fused::cpu {

at::Tensor conv_bn_act(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "conv_bn_act: x and weight must be 4-D, got ",
              x.sizes(), " and ", weight.sizes());
  const auto format = output_memory_format(x);
  // A fresh tensor (convolution never aliases its inputs), so the epilogue may run in place.
  at::Tensor out = at::convolution(x, weight, std::nullopt, stride, padding, dilation,
                                   /*transposed=*/false, /*output_padding=*/{0, 0}, groups)
                       .contiguous(format);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  if (!has_bias && !has_residual && !relu) return out;
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == out.size(1)),
              "conv_bn_act: bias must have shape [", out.size(1), "], got ", bias->sizes());
  TORCH_CHECK(!has_residual || residual->sizes() == out.sizes(),
              "conv_bn_act: residual must have the output's shape ", out.sizes(), ", got ",
              residual->sizes());
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor residual_c = has_residual ? residual->contiguous(format) : at::Tensor();
  const ChannelView view = ChannelView::of(out, format);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* r = has_residual ? residual_c.const_data_ptr<scalar_t>() : nullptr;
    for_each_element(view, [&](int64_t i, int64_t c) {
      opmath_t v = static_cast<opmath_t>(o[i]);
      if (b) v += static_cast<opmath_t>(b[c]);
      if (r) v += static_cast<opmath_t>(r[i]);
      if (relu && v < opmath_t(0)) v = opmath_t(0);  // NaN passes, as in torch.relu
      o[i] = static_cast<scalar_t>(v);
    });
  });
  return out;
}

}  // namespace resnet_fused::cpu
