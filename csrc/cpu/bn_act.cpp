// bn_act and its backward on the CPU. Statistics are two-pass sums in double (mean, then squared
// deviations), so they stay accurate for any N*H*W; elementwise math runs in the accumulation type.
#include <cmath>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include "kernels.h"
#include "loops.h"

namespace resnet_fused::cpu {
namespace {

// Per-channel parameters in the accumulation type: BN weights may be fp32 while x is fp16/bf16.
at::Tensor as_opmath(const at::Tensor& t, at::ScalarType opmath) {
  return t.to(opmath).contiguous();
}

void check_channels(const at::Tensor& t, int64_t channels, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "bn_act: ", name, " must have shape [",
              channels, "], got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, bool training, double momentum, double eps, bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "bn_act: x must be 4-D (N, C, H, W), got ", x_in.sizes());
  const int64_t channels = x_in.size(1);
  check_channels(weight, channels, "weight");
  check_channels(bias, channels, "bias");
  check_channels(running_mean, channels, "running_mean");
  check_channels(running_var, channels, "running_var");
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_residual || residual->sizes() == x_in.sizes(),
              "bn_act: residual must have x's shape ", x_in.sizes(), ", got ", residual->sizes());

  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor r = has_residual ? residual->contiguous(format) : at::Tensor();
  const ChannelView view = ChannelView::of(x, format);
  const int64_t count = view.n * view.s;  // values per channel
  TORCH_CHECK(!training || count != 1,
              "bn_act: expected more than 1 value per channel when training, got input size ",
              x_in.sizes());

  const auto opmath = at::toOpMathType(x.scalar_type());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  at::Tensor save_mean = training ? at::zeros({channels}, x.options().dtype(opmath))
                                  : as_opmath(running_mean, opmath).clone();
  at::Tensor save_invstd = at::empty({channels}, x.options().dtype(opmath));
  at::Tensor new_running_mean = running_mean.clone();
  at::Tensor new_running_var = running_var.clone();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    opmath_t* mean = save_mean.data_ptr<opmath_t>();
    opmath_t* invstd = save_invstd.data_ptr<opmath_t>();
    if (training && count > 0) {
      const auto sums = reduce_per_channel<1>(
          view, [&](int64_t i, int64_t) { return std::array<double, 1>{static_cast<double>(xp[i])}; });
      std::vector<double> mean_d(channels);
      for (int64_t c = 0; c < channels; ++c) mean_d[c] = sums[c] / count;
      const auto squares = reduce_per_channel<1>(view, [&](int64_t i, int64_t c) {
        const double d = static_cast<double>(xp[i]) - mean_d[c];
        return std::array<double, 1>{d * d};
      });
      // Running statistics exactly as F.batch_norm updates them: unbiased variance.
      // Copies (copy=true): for float64 statistics .to() would return the inputs themselves.
      at::Tensor updated_mean = running_mean.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
      at::Tensor updated_var = running_var.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
      double* rm = updated_mean.data_ptr<double>();
      double* rv = updated_var.data_ptr<double>();
      for (int64_t c = 0; c < channels; ++c) {
        const double var = squares[c] / count;
        mean[c] = static_cast<opmath_t>(mean_d[c]);
        invstd[c] = static_cast<opmath_t>(1.0 / std::sqrt(var + eps));
        rm[c] = (1 - momentum) * rm[c] + momentum * mean_d[c];
        rv[c] = (1 - momentum) * rv[c] + momentum * squares[c] / (count - 1);
      }
      new_running_mean.copy_(updated_mean);
      new_running_var.copy_(updated_var);
    } else if (training) {
      // An empty batch leaves the running statistics unchanged, as in F.batch_norm.
      save_invstd.zero_();
    } else {
      const at::Tensor var = running_var.to(at::kDouble);
      for (int64_t c = 0; c < channels; ++c)
        invstd[c] = static_cast<opmath_t>(1.0 / std::sqrt(var.const_data_ptr<double>()[c] + eps));
    }

    // out = act(x * scale + shift + residual) with scale = w * invstd, shift = b - mean * scale.
    const at::Tensor w = as_opmath(weight, opmath), b = as_opmath(bias, opmath);
    std::vector<opmath_t> scale(channels), shift(channels);
    for (int64_t c = 0; c < channels; ++c) {
      scale[c] = w.const_data_ptr<opmath_t>()[c] * invstd[c];
      shift[c] = b.const_data_ptr<opmath_t>()[c] - mean[c] * scale[c];
    }
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = has_residual ? r.const_data_ptr<scalar_t>() : nullptr;
    for_each_element(view, [&](int64_t i, int64_t c) {
      opmath_t v = static_cast<opmath_t>(xp[i]) * scale[c] + shift[c];
      if (rp) v += static_cast<opmath_t>(rp[i]);
      if (relu && v < opmath_t(0)) v = opmath_t(0);  // NaN passes, as in torch.relu
      op[i] = static_cast<scalar_t>(v);
    });
  });
  return {out, save_mean, save_invstd, new_running_mean, new_running_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in,
    const at::Tensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "bn_act_backward: x must be 4-D, got ", x_in.sizes());
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && out_in.sizes() == x_in.sizes(),
              "bn_act_backward: grad_out and out must have x's shape ", x_in.sizes());
  const int64_t channels = x_in.size(1);
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor grad_out = grad_out_in.contiguous(format);
  const at::Tensor out = out_in.contiguous(format);
  const ChannelView view = ChannelView::of(x, format);
  const int64_t count = view.n * view.s;
  const auto opmath = at::toOpMathType(x.scalar_type());
  const at::Tensor w = as_opmath(weight, opmath);
  const at::Tensor mean_t = save_mean.to(opmath).contiguous();
  const at::Tensor invstd_t = save_invstd.to(opmath).contiguous();

  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Preserve);
  at::Tensor grad_pre = at::empty_like(x, at::MemoryFormat::Preserve);
  at::Tensor grad_weight = at::empty({channels}, weight.options().dtype(at::kDouble));
  at::Tensor grad_bias = at::empty({channels}, weight.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* yp = out.const_data_ptr<scalar_t>();
    const opmath_t* mean = mean_t.const_data_ptr<opmath_t>();
    const opmath_t* invstd = invstd_t.const_data_ptr<opmath_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    // The gradient reaching the pre-activation: ReLU passes it where the output is positive.
    auto masked = [&](int64_t i) -> opmath_t {
      const opmath_t g = static_cast<opmath_t>(gp[i]);
      return relu && !(static_cast<opmath_t>(yp[i]) > opmath_t(0)) ? opmath_t(0) : g;
    };
    // One pass for both reductions: sum(g) and sum(g * xhat).
    const auto sums = reduce_per_channel<2>(view, [&](int64_t i, int64_t c) {
      const double g = masked(i);
      return std::array<double, 2>{g, g * (static_cast<double>(xp[i]) - mean[c]) * invstd[c]};
    });
    std::vector<opmath_t> mean_g(channels), mean_gxhat(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const double sum_g = sums[c], sum_gxhat = sums[channels + c];
      grad_bias.data_ptr<double>()[c] = sum_g;
      grad_weight.data_ptr<double>()[c] = sum_gxhat;
      mean_g[c] = training && count > 0 ? static_cast<opmath_t>(sum_g / count) : opmath_t(0);
      mean_gxhat[c] = training && count > 0 ? static_cast<opmath_t>(sum_gxhat / count) : opmath_t(0);
    }
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gpp = grad_pre.data_ptr<scalar_t>();
    for_each_element(view, [&](int64_t i, int64_t c) {
      const opmath_t g = masked(i);
      const opmath_t xhat = (static_cast<opmath_t>(xp[i]) - mean[c]) * invstd[c];
      // Training: the batch statistics depend on x, hence the two mean terms; eval: they are constants.
      gxp[i] = static_cast<scalar_t>(wp[c] * invstd[c] * (g - mean_g[c] - xhat * mean_gxhat[c]));
      gpp[i] = static_cast<scalar_t>(g);
    });
  });
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()), grad_pre};
}

}  // namespace resnet_fused::cpu
