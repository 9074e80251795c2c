// bn_act and its backward on the CPU, vectorized (loops.h). The forward reads x once for the statistics
// (per-chunk moments merged with Chan's formula, in double) and once to apply them; the backward makes one
// reduction pass, which also writes the ReLU-masked gradient, and one apply pass (in place over that gradient
// when the caller does not need it).
#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "loops.h"
#include "per_channel.h"

namespace resnet_fused::cpu {
namespace {

// Per-channel parameters in the accumulation type: BN weights may be fp32 while x is fp16/bf16.
at::Tensor as_opmath(const at::Tensor& t, at::ScalarType opmath) {
  return t.to(opmath).contiguous();
}

// A new 1-D tensor with `like`'s dtype and device holding `values`, each rounded once.
at::Tensor from_doubles(const std::vector<double>& values, const at::Tensor& like) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bn_act_from_doubles", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) p[i] = static_cast<scalar_t>(values[i]);
  });
  return t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, bool training, double momentum, double eps, bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "bn_act: x must be 4-D (N, C, H, W), got ", x_in.sizes());
  const int64_t channels = x_in.size(1);
  // rf.bn_act's checks (resnet_fused/ops/bn_act.py), again: the modules' training steps and the recomputing ops
  // call this op without them. The parameters share one dtype, x's or float32 for a 16-bit x.
  const auto x_dtype = x_in.scalar_type(), param_dtype = weight.scalar_type();
  const bool half_x = x_dtype == at::kHalf || x_dtype == at::kBFloat16;
  TORCH_CHECK_TYPE(param_dtype == x_dtype || (param_dtype == at::kFloat && half_x),
                   "bn_act: the BN parameters have dtype ", param_dtype, " but x has ", x_dtype,
                   "; they must match, or be float32 for a float16/bfloat16 x");
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
                                {&running_var, "running_var"}}) {
    check_per_channel("bn_act", *t, channels, name);
    TORCH_CHECK_TYPE(t->scalar_type() == param_dtype, "bn_act: weight, bias, running_mean and running_var must share "
                     "one dtype, got ", name, " ", t->scalar_type(), " and weight ", param_dtype);
  }
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    TORCH_CHECK(residual->is_cpu(), "bn_act: residual is on ", residual->device(), " but x is on cpu");
    TORCH_CHECK_TYPE(residual->scalar_type() == x_dtype, "bn_act: residual has dtype ", residual->scalar_type(),
                     " but x has ", x_dtype);
    TORCH_CHECK(residual->sizes() == x_in.sizes(), "bn_act: residual must have x's shape ", x_in.sizes(), ", got ",
                residual->sizes());
  }

  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor r = has_residual ? residual->contiguous(format) : at::Tensor();
  const ChannelView view = ChannelView::of(x, format);
  const int64_t count = view.n * view.s;  // values per channel
  TORCH_CHECK_VALUE(!training || count != 1,
                    "Expected more than 1 value per channel when training, got input size ", x_in.sizes());

  const auto opmath = at::toOpMathType(x.scalar_type());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  at::Tensor save_mean = at::empty({channels}, x.options().dtype(opmath));
  at::Tensor save_invstd = at::empty({channels}, x.options().dtype(opmath));
  // Running statistics in double, exactly as F.batch_norm updates them (unbiased variance).
  std::vector<double> new_mean = values_as<double>(running_mean), new_var = values_as<double>(running_var);
  const at::Tensor w_t = as_opmath(weight, opmath), b_t = as_opmath(bias, opmath);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Acc = Vectorized<opmath_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    opmath_t* mean = save_mean.data_ptr<opmath_t>();
    opmath_t* invstd = save_invstd.data_ptr<opmath_t>();
    double* rm = new_mean.data();
    double* rv = new_var.data();
    if (training && count > 0) {
      const Moments moments = moments_per_channel(view, xp);
      for (int64_t c = 0; c < channels; ++c) {
        mean[c] = static_cast<opmath_t>(moments.mean[c]);
        invstd[c] = static_cast<opmath_t>(1.0 / std::sqrt(moments.m2[c] / count + eps));
        rm[c] = (1 - momentum) * rm[c] + momentum * moments.mean[c];
        rv[c] = (1 - momentum) * rv[c] + momentum * moments.m2[c] / (count - 1);
      }
    } else if (training) {
      // An empty batch leaves the running statistics unchanged, as in F.batch_norm.
      for (int64_t c = 0; c < channels; ++c) mean[c] = invstd[c] = opmath_t(0);
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        mean[c] = static_cast<opmath_t>(rm[c]);
        invstd[c] = static_cast<opmath_t>(1.0 / std::sqrt(rv[c] + eps));
      }
    }

    // out = act(x * scale + shift + residual) with scale = w * invstd, shift = b - mean * scale.
    std::vector<opmath_t> scale(channels), shift(channels);
    const opmath_t* w = w_t.const_data_ptr<opmath_t>();
    const opmath_t* b = b_t.const_data_ptr<opmath_t>();
    for (int64_t c = 0; c < channels; ++c) {
      scale[c] = w[c] * invstd[c];
      shift[c] = b[c] - mean[c] * scale[c];
    }
    scalar_t* op = out.data_ptr<scalar_t>();
    const std::array<const opmath_t*, 2> params{scale.data(), shift.data()};
    with_flag(relu, [&](auto with_relu) {
      auto act = [](const Acc& v) { return relu_if<decltype(with_relu)::value>(v); };
      if (has_residual) {
        map_per_channel<scalar_t, 2, 1, 2>(
            view, {xp, r.const_data_ptr<scalar_t>()}, {op}, params, [&](const auto& in, const auto& p) {
              return std::array<Acc, 1>{act(at::vec::fmadd(in[0], p[0], p[1]) + in[1])};
            });
      } else {
        map_per_channel<scalar_t, 1, 1, 2>(view, {xp}, {op}, params, [&](const auto& in, const auto& p) {
          return std::array<Acc, 1>{act(at::vec::fmadd(in[0], p[0], p[1]))};
        });
      }
    });
  });
  if (!training || count == 0) {  // the running statistics are returned unchanged
    return {out, save_mean, save_invstd, running_mean.clone(), running_var.clone()};
  }
  return {out, save_mean, save_invstd, from_doubles(new_mean, running_mean), from_doubles(new_var, running_var)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in,
    const at::Tensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, bool relu, bool need_grad_pre) {
  TORCH_CHECK(x_in.dim() == 4, "bn_act_backward: x must be 4-D, got ", x_in.sizes());
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && out_in.sizes() == x_in.sizes(),
              "bn_act_backward: grad_out and out must have x's shape ", x_in.sizes());
  const int64_t channels = x_in.size(1);
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor grad_out = grad_out_in.contiguous(format);
  const at::Tensor out = relu ? out_in.contiguous(format) : at::Tensor();  // only for the ReLU mask
  const ChannelView view = ChannelView::of(x, format);
  const int64_t count = view.n * view.s;
  const auto opmath = at::toOpMathType(x.scalar_type());
  const at::Tensor w_t = as_opmath(weight, opmath);
  const at::Tensor mean_t = save_mean.to(opmath).contiguous();
  const at::Tensor invstd_t = save_invstd.to(opmath).contiguous();

  // With ReLU, pass 1 writes the masked gradient, which pass 2 reads; without grad_pre, into grad_x's buffer, and
  // grad_x is computed over it in place. Without ReLU the gradient is grad_out itself: nothing to write.
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Preserve);
  at::Tensor grad_pre = !relu ? (need_grad_pre ? grad_out.clone(at::MemoryFormat::Preserve) : at::Tensor())
                              : need_grad_pre ? at::empty_like(x, at::MemoryFormat::Preserve) : grad_x;
  std::vector<double> grad_weight(channels), grad_bias(channels);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Acc = Vectorized<opmath_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const opmath_t* mean = mean_t.const_data_ptr<opmath_t>();
    const opmath_t* invstd = invstd_t.const_data_ptr<opmath_t>();
    const opmath_t* w = w_t.const_data_ptr<opmath_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();

    // Pass 1: sum(g) and sum(g * (x - mean)) of g, the gradient before the ReLU: grad_out where the output is
    // positive, written out (the residual's gradient, and what pass 2 reads); without ReLU, grad_out.
    const std::array<const opmath_t*, 1> centre{mean};
    std::vector<double> sums;
    if (relu) {
      sums = sum_per_channel<scalar_t, 3, 2, 1, 1>(
          view, {gp, xp, out.const_data_ptr<scalar_t>()}, {grad_pre.data_ptr<scalar_t>()}, centre,
          [](const auto& in, const auto& p) {
            const Acc g = Acc::blendv(Acc(0), in[0], in[2] > Acc(0));
            return std::array<Acc, 3>{g, g * (in[1] - p[0]), g};
          });
      gp = grad_pre.const_data_ptr<scalar_t>();
    } else {
      sums = sum_per_channel<scalar_t, 2, 2, 0, 1>(view, {gp, xp}, {}, centre, [](const auto& in, const auto& p) {
        return std::array<Acc, 2>{in[0], in[0] * (in[1] - p[0])};
      });
    }

    // Pass 2: grad_x = a * g - a * mean(g) - a * invstd^2 * mean(g * (x - mean)) * (x - mean), a = w * invstd.
    // In eval the statistics are constants and only the first term remains.
    std::vector<opmath_t> a(channels), shift(channels), slope(channels);
    double* gw = grad_weight.data();
    double* gb = grad_bias.data();
    for (int64_t c = 0; c < channels; ++c) {
      const double sum_g = sums[c], sum_gx = sums[channels + c], is = invstd[c];
      gb[c] = sum_g;
      gw[c] = sum_gx * is;
      const double a_c = static_cast<double>(w[c]) * is;
      const bool batch_stats = training && count > 0;
      a[c] = static_cast<opmath_t>(a_c);
      shift[c] = batch_stats ? static_cast<opmath_t>(a_c * sum_g / count) : opmath_t(0);
      slope[c] = batch_stats ? static_cast<opmath_t>(a_c * is * is * sum_gx / count) : opmath_t(0);
    }
    const std::array<const opmath_t*, 4> params{a.data(), shift.data(), slope.data(), mean};
    map_per_channel<scalar_t, 2, 1, 4>(
        view, {gp, xp}, {grad_x.data_ptr<scalar_t>()}, params, [](const auto& in, const auto& p) {
          return std::array<Acc, 1>{in[0] * p[0] - p[1] - p[2] * (in[1] - p[3])};
        });
  });
  return {grad_x, from_doubles(grad_weight, weight), from_doubles(grad_bias, weight),
          need_grad_pre ? grad_pre : at::empty({0}, x.options())};
}

}  // namespace resnet_fused::cpu
