// The CUDA backend's kernels: argument checks, output allocation and launch planning here; the kernels
// in the .cu files. Ops without a CUDA kernel yet are absent here: the Python layer asks the dispatcher
// which ops have one and reports the others as not implemented for backend="cuda".
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../layout.h"
#include "bn_act_plan.h"
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

// ---- bn_act ----

void check_on_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move it with .to(x.device)");
}

void check_channels(const at::Tensor& t, int64_t channels, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [", channels,
              "] (one value per channel of x), got ", t.sizes());
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", dtype);
}

// The BN parameters' dtype must be x's, or float32 for a float16/bfloat16 x (as under autocast).
void check_param_dtype(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  const auto dtype = t.scalar_type(), x_dtype = x.scalar_type();
  const bool low_precision = x_dtype == at::kHalf || x_dtype == at::kBFloat16;
  TORCH_CHECK(dtype == x_dtype || (low_precision && dtype == at::kFloat), op, ": ", name, " has dtype ", dtype,
              " but x has ", x_dtype, "; the BN parameters must have x's dtype, or float32 for a float16/bfloat16 x");
}

// A full wave of the stats and elementwise kernels: SMs x resident 256-thread blocks. The partition
// depends on it, so results are reproducible run to run on one GPU model (no atomics anywhere).
int64_t target_blocks(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  return static_cast<int64_t>(sms) * (2048 / bn::kThreads);
}

bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The partitions of the reduction pass and of the elementwise pass (bn_act_plan.h).
struct Plans {
  bn::TilePlan reduce, elementwise;
};

Plans plans_for(const at::Tensor& x, at::MemoryFormat format, bool aligned) {
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2) * x.size(3);
  const int vec = bn::vector_width(channels_last, c, s, static_cast<int>(x.element_size()), aligned);
  const int64_t blocks = target_blocks(x);
  return {bn::make_plan(channels_last, n, c, s, vec, blocks, /*reduction=*/true),
          bn::make_plan(channels_last, n, c, s, vec, blocks, /*reduction=*/false)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const std::optional<at::Tensor>& residual, const at::Tensor& running_mean_in,
    const at::Tensor& running_var_in, bool training, double momentum, double eps, bool relu) {
  constexpr const char* op = "bn_act";
  check_x(x_in, op);
  const int64_t channels = x_in.size(1);
  const std::pair<const at::Tensor*, const char*> params[] = {{&weight_in, "weight"},
                                                               {&bias_in, "bias"},
                                                               {&running_mean_in, "running_mean"},
                                                               {&running_var_in, "running_var"}};
  for (const auto& [t, name] : params) {
    check_channels(*t, channels, op, name);
    check_on_device(*t, x_in, op, name);
    check_param_dtype(*t, x_in, op, name);
    TORCH_CHECK(t->scalar_type() == weight_in.scalar_type(), op,
                ": weight, bias, running_mean and running_var must share one dtype, got ", weight_in.scalar_type(),
                " for weight and ", t->scalar_type(), " for ", name);
  }
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), op, ": residual must have x's shape ", x_in.sizes(), ", got ",
                residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x_in.scalar_type(), op, ": residual has dtype ",
                residual->scalar_type(), " but x has ", x_in.scalar_type());
    check_on_device(*residual, x_in, op, "residual");
  }
  const int64_t count = x_in.size(0) * x_in.size(2) * x_in.size(3);  // values per channel
  TORCH_CHECK(!training || count != 1,
              "bn_act: expected more than 1 value per channel when training, got input size ", x_in.sizes());

  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor r = has_residual ? residual->contiguous(format) : at::Tensor();
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor running_mean = running_mean_in.contiguous(), running_var = running_var_in.contiguous();
  const auto opmath = at::toOpMathType(x.scalar_type());

  // Allocated exactly as the fake kernel in resnet_fused/ops/bn_act.py does.
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor save_mean = at::empty({channels}, x.options().dtype(opmath));
  at::Tensor save_invstd = at::empty({channels}, x.options().dtype(opmath));
  at::Tensor new_running_mean = at::empty_like(running_mean_in);
  at::Tensor new_running_var = at::empty_like(running_var_in);
  TORCH_INTERNAL_ASSERT(new_running_mean.is_contiguous() && new_running_var.is_contiguous());

  const Plans plans = plans_for(x, format, aligned16(x) && aligned16(r) && aligned16(out));
  at::Tensor workspace = at::empty({bn::forward_workspace_size(plans.reduce, training)}, x.options().dtype(opmath));
  bn_act_forward_launch(plans.reduce, plans.elementwise, x, r, weight, bias, running_mean, running_var, training,
                        momentum, eps, relu, out, save_mean, save_invstd, new_running_mean, new_running_var,
                        workspace);
  return {out, save_mean, save_invstd, new_running_mean, new_running_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& save_mean_in, const at::Tensor& save_invstd_in, bool training, bool relu,
    bool need_grad_pre) {
  constexpr const char* op = "bn_act_backward";
  check_x(x_in, op);
  const int64_t channels = x_in.size(1);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && out_in.sizes() == x_in.sizes(), op,
              ": grad_out and out must have x's shape ", x_in.sizes(), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == x_in.scalar_type() && out_in.scalar_type() == x_in.scalar_type(), op,
              ": grad_out and out must have x's dtype ", x_in.scalar_type(), ", got ", grad_out_in.scalar_type(),
              " and ", out_in.scalar_type());
  check_on_device(grad_out_in, x_in, op, "grad_out");
  check_on_device(out_in, x_in, op, "out");
  check_channels(weight_in, channels, op, "weight");
  check_on_device(weight_in, x_in, op, "weight");
  check_param_dtype(weight_in, x_in, op, "weight");
  check_channels(save_mean_in, channels, op, "save_mean");
  check_channels(save_invstd_in, channels, op, "save_invstd");
  check_on_device(save_mean_in, x_in, op, "save_mean");
  check_on_device(save_invstd_in, x_in, op, "save_invstd");

  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor grad_out = grad_out_in.contiguous(format);
  const at::Tensor out = out_in.contiguous(format);
  const auto opmath = at::toOpMathType(x.scalar_type());
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor save_mean = save_mean_in.to(opmath).contiguous();
  const at::Tensor save_invstd = save_invstd_in.to(opmath).contiguous();

  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor grad_pre = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor grad_weight = at::empty_like(weight_in);
  at::Tensor grad_bias = at::empty_like(weight_in);
  TORCH_INTERNAL_ASSERT(grad_weight.is_contiguous() && grad_bias.is_contiguous());

  const bool aligned =
      aligned16(x) && aligned16(grad_out) && aligned16(out) && aligned16(grad_x) && aligned16(grad_pre);
  const Plans plans = plans_for(x, format, aligned);
  at::Tensor workspace = at::empty({bn::backward_workspace_size(plans.reduce)}, x.options().dtype(opmath));
  bn_act_backward_launch(plans.reduce, plans.elementwise, grad_out, out, x, weight, save_mean, save_invstd,
                         training, relu, grad_x, grad_weight, grad_bias, grad_pre, workspace);
  // The kernels always write grad_pre; the schema's contract is an empty one when it is not asked for.
  return {grad_x, grad_weight, grad_bias, need_grad_pre ? grad_pre : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace resnet_fused::cuda

// Test and benchmark hooks of the conv kernels (kernels.h); not part of the API.
TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def(
      "_cuda_conv_bn_act_with(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu, str kernel) -> Tensor");
  m.def(
      "_cuda_conv_kernel(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> str");
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act", &resnet_fused::cuda::conv_bn_act);
  m.impl("_cuda_conv_bn_act_with", &resnet_fused::cuda::conv_bn_act_with_kernel);
  m.impl("_cuda_conv_kernel", &resnet_fused::cuda::conv_kernel_for);
  m.impl("add_act", &resnet_fused::cuda::add_act);
  m.impl("bn_act", &resnet_fused::cuda::bn_act);
  m.impl("bn_act_backward", &resnet_fused::cuda::bn_act_backward);
}
