// add_act on the CPU: out = act(x + residual) in one vectorized pass, in the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "loops.h"

namespace resnet_fused::cpu {

at::Tensor add_act(const at::Tensor& x_in, const at::Tensor& residual, bool relu) {
  TORCH_CHECK(x_in.sizes() == residual.sizes(), "add_act: residual must have x's shape ",
              x_in.sizes(), ", got ", residual.sizes());
  TORCH_CHECK(x_in.scalar_type() == residual.scalar_type(), "add_act: x and residual dtypes differ (",
              x_in.scalar_type(), " vs ", residual.scalar_type(), ")");
  const auto format = x_in.dim() == 4 ? output_memory_format(x_in) : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(format), r = residual.contiguous(format);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  // Elementwise: the whole tensor as one plane of one channel.
  const ChannelView flat{1, 1, x.numel(), x.numel(), x.numel(), 1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_act_cpu", [&] {
    using Acc = Vectorized<at::opmath_type<scalar_t>>;
    with_flag(relu, [&](auto with_relu) {
      map_per_channel<scalar_t, 2, 1, 0>(
          flat, {x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>()}, {out.data_ptr<scalar_t>()}, {},
          [](const auto& in, const auto&) {
            return std::array<Acc, 1>{relu_if<decltype(with_relu)::value>(in[0] + in[1])};
          });
    });
  });
  return out;
}

}  // namespace resnet_fused::cpu
