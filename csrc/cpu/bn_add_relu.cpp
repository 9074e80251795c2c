// bn_add_relu on the CPU: relu(y * scale[c] + shift[c] + residual'), where residual' is residual * residual_scale[c]
// + residual_shift[c] (a downsample branch's BN) or the residual itself: one vectorized pass, in y's accumulation
// type. It is a block's exit when the block trains on conv_stats, and the ReLU output that the recomputing
// training ops (resnet_fused/ops/recomputed_bn_relu.py) rebuild in their backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "loops.h"
#include "per_channel.h"

namespace resnet_fused::cpu {

at::Tensor bn_add_relu(const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& shift,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                       const std::optional<at::Tensor>& residual_shift) {
  TORCH_CHECK(y_in.dim() == 4, "bn_add_relu: y must be 4-D (N, C, H, W), got ", y_in.sizes());
  const int64_t channels = y_in.size(1);
  check_per_channel("bn_add_relu", scale, channels, "scale");
  check_per_channel("bn_add_relu", shift, channels, "shift");
  const bool has_residual = residual.has_value() && residual->defined();
  const bool affine = residual_scale.has_value() && residual_scale->defined();
  TORCH_CHECK(affine == (residual_shift.has_value() && residual_shift->defined()),
              "bn_add_relu: residual_scale and residual_shift go together");
  TORCH_CHECK(!affine || has_residual, "bn_add_relu: residual_scale and residual_shift need a residual");
  TORCH_CHECK(!has_residual || residual->sizes() == y_in.sizes(), "bn_add_relu: residual must have y's shape ",
              y_in.sizes(), ", got ", residual->sizes());
  TORCH_CHECK(!has_residual || residual->scalar_type() == y_in.scalar_type(), "bn_add_relu: y and residual dtypes "
              "differ (", y_in.scalar_type(), " vs ", residual->scalar_type(), ")");
  if (affine) {
    check_per_channel("bn_add_relu", *residual_scale, channels, "residual_scale");
    check_per_channel("bn_add_relu", *residual_shift, channels, "residual_shift");
  }

  const auto format = output_memory_format(y_in);
  const at::Tensor y = y_in.contiguous(format);
  const at::Tensor r = has_residual ? residual->contiguous(format) : at::Tensor();
  at::Tensor out = at::empty_like(y, at::MemoryFormat::Preserve);
  const ChannelView view = ChannelView::of(y, format);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Acc = Vectorized<opmath_t>;
    const std::vector<opmath_t> s = values_as<opmath_t>(scale);
    std::vector<opmath_t> t = values_as<opmath_t>(shift);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto relu = [](const Acc& v) { return relu_if<true>(v); };
    if (affine) {
      // One shift for both BNs: shift[c] + residual_shift[c].
      const std::vector<opmath_t> rs = values_as<opmath_t>(*residual_scale);
      const std::vector<opmath_t> rt = values_as<opmath_t>(*residual_shift);
      for (int64_t c = 0; c < channels; ++c) t[c] += rt[c];
      map_per_channel<scalar_t, 2, 1, 3>(view, {yp, r.const_data_ptr<scalar_t>()}, {op},
                                         {s.data(), t.data(), rs.data()},
                                         [&](const auto& in, const auto& p) {
                                           return std::array<Acc, 1>{relu(at::vec::fmadd(
                                               in[1], p[2], at::vec::fmadd(in[0], p[0], p[1])))};
                                         });
    } else if (has_residual) {
      map_per_channel<scalar_t, 2, 1, 2>(view, {yp, r.const_data_ptr<scalar_t>()}, {op}, {s.data(), t.data()},
                                         [&](const auto& in, const auto& p) {
                                           return std::array<Acc, 1>{relu(at::vec::fmadd(in[0], p[0], p[1]) + in[1])};
                                         });
    } else {
      map_per_channel<scalar_t, 1, 1, 2>(view, {yp}, {op}, {s.data(), t.data()}, [&](const auto& in, const auto& p) {
        return std::array<Acc, 1>{relu(at::vec::fmadd(in[0], p[0], p[1]))};
      });
    }
  });
  return out;
}

}  // namespace resnet_fused::cpu
