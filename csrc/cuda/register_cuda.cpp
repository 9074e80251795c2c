// The CUDA backend's kernels. Ops without a CUDA kernel yet are absent here: the Python layer asks
// the dispatcher which ops have one and reports the others as not implemented for backend="cuda".
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../layout.h"
#include "kernels.h"

namespace resnet_fused::cuda {
namespace {

at::Tensor add_act(const at::Tensor& x, const at::Tensor& residual, bool relu) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_act: residual must have x's shape ", x.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "add_act: x and residual dtypes differ (",
              x.scalar_type(), " vs ", residual.scalar_type(), ")");
  TORCH_CHECK(x.device() == residual.device(), "add_act: x is on ", x.device(), " but residual on ",
              residual.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto format = x.dim() == 4 ? output_memory_format(x) : at::MemoryFormat::Contiguous;
  const at::Tensor xc = x.contiguous(format), rc = residual.contiguous(format);
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Preserve);
  add_act_launch(xc, rc, out, relu);
  return out;
}

}  // namespace
}  // namespace resnet_fused::cuda

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("add_act", &resnet_fused::cuda::add_act);
}
