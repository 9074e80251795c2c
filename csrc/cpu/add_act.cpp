// add_act on the CPU: out = act(x + residual) in one pass, in the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_act_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        opmath_t v = static_cast<opmath_t>(xp[i]) + static_cast<opmath_t>(rp[i]);
        if (relu && v < opmath_t(0)) v = opmath_t(0);  // NaN passes, as in torch.relu
        op[i] = static_cast<scalar_t>(v);
      }
    });
  });
  return out;
}

}  // namespace resnet_fused::cpu
