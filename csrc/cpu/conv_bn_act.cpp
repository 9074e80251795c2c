// conv_bn_act on the CPU. Where oneDNN takes the convolution (float32, and bfloat16 on CPUs with bf16
// support), it runs as one oneDNN primitive with the bias, the residual add and the ReLU as post-ops,
// through the mkldnn ops that Inductor's CPU backend calls: the epilogue costs no pass over the output.
// conv_bn_act_into_residual is the same computation written into the residual's own buffer, for callers that
// own it (a ResNet's blocks in inference): no copy of the residual. conv_bn_act_chain runs conv_bn_act steps (a
// block's main path, or a module's single step) as one call, and conv_bn_act_chain_into_residual the same ending
// in conv_bn_act_into_residual. The weight may be prepacked into oneDNN's blocked layout
// (mkldnn::_reorder_convolution_weight, an MKLDNN tensor), which saves the reorder on every call.
// Anything else runs ATen's convolution, then the whole epilogue in one vectorized pass over the output.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/native/ConvUtils.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/convolution.h>
#include <c10/util/accumulate.h>

#include "kernels.h"
#include "loops.h"
#include "per_channel.h"

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

// act(conv(x, weight) + bias [+ residual]) as one oneDNN convolution with post-ops. With a residual, oneDNN adds
// the convolution into `residual` in place, which reads it once and writes the output once, as the fused
// epilogue should: `residual` is the output buffer (the caller's copy of the residual, or the residual itself).
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
  static const c10::OperatorHandle op = mkldnn_op("mkldnn::_convolution_pointwise_", "binary");
  stack = {residual, x, weight, bias, padding.vec(), stride.vec(), dilation.vec(), groups, std::string("add"),
           c10::IValue(), unary, no_scalars, c10::IValue()};
  op.callBoxed(stack);
  return residual;
}

// What both ops decide before computing: the input in the output's memory format, the bias made contiguous,
// the output's shape, and whether oneDNN runs the convolution.
struct ConvPlan {
  at::MemoryFormat format;
  at::Tensor x;
  std::optional<at::Tensor> bias;
  std::vector<int64_t> out_shape;
  bool onednn;
};

ConvPlan plan_conv(const char* op, const at::Tensor& x_in, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& residual, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x_in.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D, got ", x_in.sizes(), " and ",
              weight.sizes());
  ConvPlan plan;
  plan.format = output_memory_format(x_in);
  plan.x = x_in.contiguous(plan.format);
  const at::Tensor& x = plan.x;
  const int64_t channels = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_per_channel(op, *bias, channels, "bias");
    plan.bias = bias->contiguous();
  }

  // The output's shape, checked against the residual's before oneDNN writes into the residual's buffer.
  plan.out_shape = at::native::conv_output_size(x.sizes(), weight.sizes(), padding, stride, dilation);
  TORCH_CHECK(!residual.defined() || residual.sizes() == at::IntArrayRef(plan.out_shape), op,
              ": residual must have the output's shape ", plan.out_shape, ", got ", residual.sizes());

  // 16-bit NCHW: the mkldnn op computes the residual add and ReLU with ATen's add_relu, which lacks them.
  const bool onednn_takes = mkldnn_supports(x.scalar_type()) && x.size(0) > 0 &&
                           (x.scalar_type() == at::kFloat || plan.format == at::MemoryFormat::ChannelsLast);
  plan.onednn = onednn_takes && (weight.is_mkldnn() || c10::multiply_integers(plan.out_shape) >= kOneDnnMinOutput);
  TORCH_CHECK(onednn_takes || !weight.is_mkldnn(), op,
              ": a prepacked (MKLDNN) weight needs a convolution oneDNN runs (float32, or bfloat16 in channels_last "
              "where the CPU has it; batch > 0; oneDNN enabled); got dtype ", x.scalar_type(), ", batch ", x.size(0),
              ", ", plan.format == at::MemoryFormat::ChannelsLast ? "channels_last" : "NCHW");
  return plan;
}

// ATen's convolution: a fresh tensor (convolution never aliases its inputs), in the plan's memory format.
at::Tensor aten_conv(const ConvPlan& plan, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  return at::convolution(plan.x, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups)
      .contiguous(plan.format);
}

// dest = act(conv + bias [+ residual]) in one vectorized pass; dest may be conv or residual (same shape and
// format: each element is read before it is written).
void epilogue(const ConvPlan& plan, const at::Tensor& conv, const at::Tensor& residual, bool relu, at::Tensor& dest) {
  const int64_t channels = conv.size(1);
  const ChannelView view = ChannelView::of(conv, plan.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "conv_bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Acc = Vectorized<opmath_t>;
    // The bias in the accumulation type (zeros without one), so one loop serves every epilogue.
    std::vector<opmath_t> shift(channels, opmath_t(0));
    if (plan.bias) {
      const scalar_t* b = plan.bias->const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) shift[c] = static_cast<opmath_t>(b[c]);
    }
    const scalar_t* o = conv.const_data_ptr<scalar_t>();
    scalar_t* d = dest.data_ptr<scalar_t>();
    const std::array<const opmath_t*, 1> params{shift.data()};
    with_flag(relu, [&](auto with_relu) {
      auto act = [](const Acc& v) { return relu_if<decltype(with_relu)::value>(v); };
      if (residual.defined()) {
        map_per_channel<scalar_t, 2, 1, 1>(view, {o, residual.const_data_ptr<scalar_t>()}, {d}, params,
                                           [&](const auto& in, const auto& p) {
                                             return std::array<Acc, 1>{act(in[0] + p[0] + in[1])};
                                           });
      } else {
        map_per_channel<scalar_t, 1, 1, 1>(view, {o}, {d}, params, [&](const auto& in, const auto& p) {
          return std::array<Acc, 1>{act(in[0] + p[0])};
        });
      }
    });
  });
}

}  // namespace

at::Tensor conv_bn_act(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  const at::Tensor residual = residual_in.has_value() ? *residual_in : at::Tensor();
  const ConvPlan plan = plan_conv("conv_bn_act", x_in, weight, bias, residual, stride, padding, dilation);
  if (plan.onednn) {
    // oneDNN writes into the residual's buffer: a copy of it, since the caller keeps the residual.
    return onednn_conv_bn_act(plan.x, weight, plan.bias, residual.defined() ? at::clone(residual, plan.format)
                                                                            : at::Tensor(),
                              stride, padding, dilation, groups, relu, plan.format);
  }
  at::Tensor out = aten_conv(plan, weight, stride, padding, dilation, groups);
  if (!plan.bias && !residual.defined() && !relu) return out;
  epilogue(plan, out, residual.defined() ? residual.contiguous(plan.format) : at::Tensor(), relu, out);
  return out;
}

void conv_bn_act_into_residual(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::Tensor& residual,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvPlan plan = plan_conv("conv_bn_act_into_residual", x_in, weight, bias, residual, stride, padding,
                                  dilation);
  TORCH_CHECK(residual.scalar_type() == plan.x.scalar_type(), "conv_bn_act_into_residual: residual must have x's "
              "dtype ", plan.x.scalar_type(), ", got ", residual.scalar_type());
  TORCH_CHECK(residual.is_contiguous(plan.format), "conv_bn_act_into_residual: residual must be contiguous in x's "
              "memory format (", plan.format == at::MemoryFormat::ChannelsLast ? "channels_last" : "NCHW",
              "): it is the output");
  // The output overwrites the residual while the convolution reads x, the weight and the bias.
  at::assert_no_overlap(residual, plan.x);
  if (weight.layout() == at::kStrided) at::assert_no_overlap(residual, weight);
  if (plan.bias) at::assert_no_overlap(residual, *plan.bias);
  if (plan.onednn) {
    onednn_conv_bn_act(plan.x, weight, plan.bias, residual, stride, padding, dilation, groups, relu, plan.format);
    return;
  }
  epilogue(plan, aten_conv(plan, weight, stride, padding, dilation, groups), residual, relu, residual);
}

namespace {

// The steps of a chain but the last: y = conv_bn_act(y, weights[i], biases[i], relu=true), after checking the
// arguments; returns y and leaves the last convolution's geometry in `last` (stride, padding, dilation pairs, then
// groups).
at::Tensor run_chain_head(const char* op, const at::Tensor& x, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef geometry,
                          at::IntArrayRef& last) {
  constexpr int64_t kPerConv = 7;  // stride, padding, dilation (pairs), groups
  const int64_t convs = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(convs >= 1, op, ": needs at least one weight");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == convs, op, ": ", convs, " weights but ", biases.size(),
                    " biases (None for a convolution without one)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(geometry.size()) == kPerConv * convs, op,
                    ": geometry holds 7 ints per convolution (stride, padding and dilation as pairs, then groups): ",
                    kPerConv * convs, " for ", convs, " weights, got ", geometry.size());
  at::Tensor y = x;
  for (int64_t i = 0; i + 1 < convs; ++i) {
    const at::IntArrayRef g = geometry.slice(kPerConv * i, kPerConv);
    y = conv_bn_act(y, weights[i], biases.get(i), std::nullopt, g.slice(0, 2), g.slice(2, 2), g.slice(4, 2), g[6],
                    /*relu=*/true);
  }
  last = geometry.slice(kPerConv * (convs - 1), kPerConv);
  return y;
}

}  // namespace

at::Tensor conv_bn_act_chain(const at::Tensor& x, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef geometry,
                             const std::optional<at::Tensor>& residual, bool relu) {
  at::IntArrayRef g;
  const at::Tensor y = run_chain_head("conv_bn_act_chain", x, weights, biases, geometry, g);
  return conv_bn_act(y, weights.back(), biases.get(weights.size() - 1), residual, g.slice(0, 2), g.slice(2, 2),
                     g.slice(4, 2), g[6], relu);
}

void conv_bn_act_chain_into_residual(const at::Tensor& x, at::TensorList weights,
                                     const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef geometry,
                                     at::Tensor& residual, bool relu) {
  at::IntArrayRef g;
  const at::Tensor y = run_chain_head("conv_bn_act_chain_into_residual", x, weights, biases, geometry, g);
  conv_bn_act_into_residual(y, weights.back(), biases.get(weights.size() - 1), residual, g.slice(0, 2),
                            g.slice(2, 2), g.slice(4, 2), g[6], relu);
}

}  // namespace resnet_fused::cpu
