// conv_bn_act on the CPU. Where oneDNN takes the convolution (float32, and bfloat16 on CPUs with bf16
// support), it runs as one oneDNN primitive with the bias, the residual add and the ReLU as post-ops,
// through the mkldnn ops that Inductor's CPU backend calls: the epilogue costs no pass over the output.
// The weight may be prepacked into oneDNN's blocked layout (mkldnn::_reorder_convolution_weight, an MKLDNN
// tensor), which saves the reorder on every call. Anything else runs ATen's convolution, then the whole
// epilogue in one vectorized pass over the output.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/ConvUtils.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/convolution.h>
#include <c10/util/accumulate.h>

#include "kernels.h"
#include "loops.h"

namespace resnet_fused::cpu {
namespace {

// Outputs smaller than this run ATen's convolution and the epilogue pass on plain weights: the mkldnn op builds
// its oneDNN primitive on every call (about 15 us more than ATen's cached one, measured here), more than the
// epilogue pass costs on so few values. resnet_fused/nn/fused.py packs weights only above the same size.
constexpr int64_t kOneDnnMinOutput = 16384;

c10::OperatorHandle mkldnn_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

bool mkldnn_supports(at::ScalarType dtype) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  if (dtype == at::kFloat) return true;
  auto supported = [](const char* query) {
    torch::jit::Stack stack;
    mkldnn_op(query, "").callBoxed(stack);
    return stack.at(0).toBool();
  };
  // The queries look at the CPU's instruction set: ask once.
  static const bool bf16 = supported("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = supported("mkldnn::_is_mkldnn_fp16_supported");
  return (dtype == at::kBFloat16 && bf16) || (dtype == at::kHalf && fp16);
}

// out = act(conv(x, weight) + bias [+ residual]) as one oneDNN convolution with post-ops.
at::Tensor onednn_conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, bool relu, at::MemoryFormat format) {
  const c10::IValue unary = relu ? c10::IValue(std::string("relu")) : c10::IValue();
  const c10::List<std::optional<at::Scalar>> no_scalars;
  torch::jit::Stack stack;
  if (!residual.defined()) {
    static const c10::OperatorHandle op = mkldnn_op("mkldnn::_convolution_pointwise", "");
    stack = {x, weight, bias, padding.vec(), stride.vec(), dilation.vec(), groups,
             std::string(relu ? "relu" : "none"), no_scalars, c10::IValue()};
    op.callBoxed(stack);
    // With a prepacked weight oneDNN answers in channels_last whatever the input's format.
    return stack.at(0).toTensor().contiguous(format);
  }
  // The residual's copy is the output buffer: oneDNN adds the convolution into it in place, which reads the
  // residual once and writes the output once, as the fused epilogue should.
  at::Tensor out = at::clone(residual, format);
  static const c10::OperatorHandle op = mkldnn_op("mkldnn::_convolution_pointwise_", "binary");
  stack = {out, x, weight, bias, padding.vec(), stride.vec(), dilation.vec(), groups, std::string("add"),
           c10::IValue(), unary, no_scalars, c10::IValue()};
  op.callBoxed(stack);
  return out;
}

}  // namespace

at::Tensor conv_bn_act(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(x_in.dim() == 4 && weight.dim() == 4, "conv_bn_act: x and weight must be 4-D, got ",
              x_in.sizes(), " and ", weight.sizes());
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  const int64_t channels = weight.size(0);
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == channels),
              "conv_bn_act: bias must have shape [", channels, "], got ", bias->sizes());
  const std::optional<at::Tensor> bias_c = has_bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;

  // The output's shape, checked against the residual's before oneDNN writes into the residual's copy.
  const std::vector<int64_t> out_shape = at::native::conv_output_size(x.sizes(), weight.sizes(), padding, stride, dilation);
  TORCH_CHECK(!has_residual || residual->sizes() == at::IntArrayRef(out_shape),
              "conv_bn_act: residual must have the output's shape ", out_shape, ", got ", residual->sizes());

  // 16-bit NCHW: the mkldnn op computes the residual add and ReLU with ATen's add_relu, which lacks them.
  const bool onednn_takes = mkldnn_supports(x.scalar_type()) && x.size(0) > 0 &&
                           (x.scalar_type() == at::kFloat || format == at::MemoryFormat::ChannelsLast);
  const bool onednn = onednn_takes && (weight.is_mkldnn() || c10::multiply_integers(out_shape) >= kOneDnnMinOutput);
  TORCH_CHECK(onednn_takes || !weight.is_mkldnn(),
              "conv_bn_act: a prepacked (MKLDNN) weight needs a convolution oneDNN runs (float32, or bfloat16 in "
              "channels_last where the CPU has it; batch > 0; oneDNN enabled); got dtype ", x.scalar_type(),
              ", batch ", x.size(0), ", ", format == at::MemoryFormat::ChannelsLast ? "channels_last" : "NCHW");
  if (onednn) {
    return onednn_conv_bn_act(x, weight, bias_c, has_residual ? *residual : at::Tensor(), stride, padding,
                              dilation, groups, relu, format);
  }

  // A fresh tensor (convolution never aliases its inputs), so the epilogue may run in place.
  at::Tensor out = at::convolution(x, weight, std::nullopt, stride, padding, dilation,
                                   /*transposed=*/false, /*output_padding=*/{0, 0}, groups)
                       .contiguous(format);
  if (!has_bias && !has_residual && !relu) return out;
  const at::Tensor residual_c = has_residual ? residual->contiguous(format) : at::Tensor();
  const ChannelView view = ChannelView::of(out, format);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Acc = Vectorized<opmath_t>;
    // The bias in the accumulation type (zeros without one), so one loop serves every epilogue.
    std::vector<opmath_t> shift(channels, opmath_t(0));
    if (has_bias) {
      const scalar_t* b = bias_c->const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) shift[c] = static_cast<opmath_t>(b[c]);
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    const std::array<const opmath_t*, 1> params{shift.data()};
    auto act = [relu](const Acc& v) { return relu ? at::vec::maximum(v, Acc(0)) : v; };  // NaN passes
    if (has_residual) {
      map_per_channel<scalar_t, 2, 1, 1>(view, {o, residual_c.const_data_ptr<scalar_t>()}, {o}, params,
                                         [&](const auto& in, const auto& p) {
                                           return std::array<Acc, 1>{act(in[0] + p[0] + in[1])};
                                         });
    } else {
      map_per_channel<scalar_t, 1, 1, 1>(view, {o}, {o}, params, [&](const auto& in, const auto& p) {
        return std::array<Acc, 1>{act(in[0] + p[0])};
      });
    }
  });
  return out;
}

}  // namespace resnet_fused::cpu
