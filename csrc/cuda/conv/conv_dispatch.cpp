// conv_bn_act on CUDA: argument checks, NHWC/OHWI operands, the kernel choice, the launch. The kernels
// (conv_launch.h) take plain pointers; this file is the only one that sees both torch and them.
//
// The kernel table, first match wins:
//   cutlass_sm90  compute capability 9.0, float16/bfloat16, groups 1, C and K multiples of 8, 16-byte aligned
//                 tensors, and CUTLASS's can_implement accepts the problem (TMA im2col limits);
//   mma_sm80      the same conditions on any compute capability 8.0 or later;
//   direct        everything else (float32, float64, groups, odd channel counts, older GPUs).
#include <string>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "../../layout.h"
#include "../kernels.h"
#include "conv_launch.h"

namespace resnet_fused::cuda {
namespace {

using conv::ConvArgs;
using conv::DType;

enum class ConvKernel { kCutlassSm90, kMmaSm80, kDirect };

const char* kernel_name(ConvKernel kernel) {
  switch (kernel) {
    case ConvKernel::kCutlassSm90: return "cutlass_sm90";
    case ConvKernel::kMmaSm80: return "mma_sm80";
    case ConvKernel::kDirect: return "direct";
  }
  return "?";
}

int32_t checked_int32(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, "conv_bn_act: ", what, " = ", v, " does not fit the CUDA kernels' 32-bit sizes");
  return static_cast<int32_t>(v);
}

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "conv_bn_act: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  }
}

void check_operand(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == x.device(), "conv_bn_act: ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "conv_bn_act: ", name, " has dtype ", t->scalar_type(),
              " but x has ", x.scalar_type());
}

// The operands in the kernels' layouts and the call's description. The tensors own the memory the
// pointers in `args` point to.
struct Call {
  at::Tensor x, weight, bias, residual, out;
  ConvArgs args;
};

Call prepare(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
             const std::optional<at::Tensor>& residual_in, at::IntArrayRef stride, at::IntArrayRef padding,
             at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(x_in.is_cuda(), "conv_bn_act: x must be a CUDA tensor, got one on ", x_in.device());
  TORCH_CHECK(x_in.dim() == 4 && weight_in.dim() == 4, "conv_bn_act: x and weight must be 4-D, got ", x_in.sizes(),
              " and ", weight_in.sizes());
  const DType dtype = dtype_of(x_in);
  check_operand(weight_in, x_in, "weight");
  check_operand(bias_in, x_in, "bias");
  check_operand(residual_in, x_in, "residual");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv_bn_act: stride, padding and dilation must have two values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "conv_bn_act: stride and dilation must be positive and padding non-negative, got stride ", stride,
              ", padding ", padding, ", dilation ", dilation);
  const int64_t k = weight_in.size(0);
  TORCH_CHECK(groups > 0 && x_in.size(1) == weight_in.size(1) * groups && k % groups == 0, "conv_bn_act: x has ",
              x_in.size(1), " channels and weight shape ", weight_in.sizes(), ", which groups=", groups, " does not fit");

  conv::Problem pr{};
  pr.n = checked_int32(x_in.size(0), "batch");
  pr.c = checked_int32(x_in.size(1), "channels");
  pr.h = checked_int32(x_in.size(2), "height");
  pr.w = checked_int32(x_in.size(3), "width");
  pr.k = checked_int32(k, "output channels");
  pr.r = checked_int32(weight_in.size(2), "kernel height");
  pr.s = checked_int32(weight_in.size(3), "kernel width");
  pr.stride_h = checked_int32(stride[0], "stride");
  pr.stride_w = checked_int32(stride[1], "stride");
  pr.pad_h = checked_int32(padding[0], "padding");
  pr.pad_w = checked_int32(padding[1], "padding");
  pr.dil_h = checked_int32(dilation[0], "dilation");
  pr.dil_w = checked_int32(dilation[1], "dilation");
  const int64_t p = (x_in.size(2) + 2 * padding[0] - dilation[0] * (pr.r - 1) - 1) / stride[0] + 1;
  const int64_t q = (x_in.size(3) + 2 * padding[1] - dilation[1] * (pr.s - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(p > 0 && q > 0, "conv_bn_act: the input ", x_in.sizes(), " with padding ", padding,
              " is smaller than the kernel ", weight_in.sizes(), " with dilation ", dilation);
  // The kernels compute p * stride - pad and h + r * dilation in 32 bits.
  checked_int32(x_in.size(2) + 2 * padding[0] + dilation[0] * pr.r, "height + padding + kernel extent");
  checked_int32(x_in.size(3) + 2 * padding[1] + dilation[1] * pr.s, "width + padding + kernel extent");
  pr.p = checked_int32(p, "output height");
  pr.q = checked_int32(q, "output width");
  checked_int32(pr.gemm_m(), "batch * output height * output width");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const bool has_residual = residual_in.has_value() && residual_in->defined();
  TORCH_CHECK(!has_bias || (bias_in->dim() == 1 && bias_in->size(0) == k), "conv_bn_act: bias must have shape [", k,
              "], got ", bias_in->sizes());
  const std::vector<int64_t> out_shape{x_in.size(0), k, p, q};
  TORCH_CHECK(!has_residual || residual_in->sizes() == at::IntArrayRef(out_shape),
              "conv_bn_act: residual must have the output's shape ", out_shape, ", got ", residual_in->sizes());

  Call call;
  constexpr auto nhwc = at::MemoryFormat::ChannelsLast;
  call.x = x_in.contiguous(nhwc);
  call.weight = weight_in.contiguous(nhwc);  // KCRS with channels_last strides = OHWI storage
  call.bias = has_bias ? bias_in->contiguous() : at::Tensor();
  call.residual = has_residual ? residual_in->contiguous(nhwc) : at::Tensor();
  call.out = at::empty(out_shape, x_in.options().memory_format(nhwc));
  call.args = ConvArgs{pr,
                       static_cast<int32_t>(groups),
                       dtype,
                       call.x.const_data_ptr(),
                       call.weight.const_data_ptr(),
                       has_bias ? call.bias.const_data_ptr() : nullptr,
                       has_residual ? call.residual.const_data_ptr() : nullptr,
                       call.out.mutable_data_ptr(),
                       relu,
                       c10::cuda::getCurrentCUDAStream(x_in.get_device()).stream()};
  return call;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Why the tensor-core kernels cannot take the call, or nullptr when they can.
const char* tensor_core_refusal(const ConvArgs& a) {
  if (a.dtype != DType::kHalf && a.dtype != DType::kBFloat16) return "they take float16 and bfloat16 only";
  if (a.groups != 1) return "they take groups=1 only";
  if (a.problem.c % 8 != 0 || a.problem.k % 8 != 0) return "they need input and output channels that are multiples of 8";
  for (const void* p : {a.x, a.weight, a.bias, a.residual, static_cast<const void*>(a.out)})
    if (p && !aligned16(p)) return "they need 16-byte aligned tensors";
  return nullptr;
}

int device_major(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

int device_minor(int device) {
  int minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return minor;
}

// Why `kernel` cannot run `call`, or nullptr when it can.
const char* refusal(ConvKernel kernel, const Call& call) {
  if (kernel == ConvKernel::kDirect) return nullptr;
  if (const char* why = tensor_core_refusal(call.args)) return why;
  const int device = call.x.get_device();
  if (kernel == ConvKernel::kMmaSm80)
    return device_major(device) >= 8 ? nullptr : "it needs compute capability 8.0 or later";
#ifdef RESNET_FUSED_SM90
  if (device_major(device) != 9 || device_minor(device) != 0) return "it runs on compute capability 9.0 only";
  return conv::conv_sm90_workspace(call.args) >= 0 ? nullptr : "CUTLASS's can_implement refuses the problem";
#else
  return "this build has no sm_90a code (RESNET_FUSED_CUDA_ARCHS)";
#endif
}

ConvKernel choose(const Call& call) {
  for (ConvKernel kernel : {ConvKernel::kCutlassSm90, ConvKernel::kMmaSm80})
    if (refusal(kernel, call) == nullptr) return kernel;
  return ConvKernel::kDirect;
}

ConvKernel parse_kernel(std::string_view name) {
  for (ConvKernel kernel : {ConvKernel::kCutlassSm90, ConvKernel::kMmaSm80, ConvKernel::kDirect})
    if (name == kernel_name(kernel)) return kernel;
  TORCH_CHECK(false, "conv_bn_act: unknown CUDA conv kernel '", name, "'; expected cutlass_sm90, mma_sm80 or direct");
}

int multiprocessors(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

void run(ConvKernel kernel, Call& call) {
  const c10::cuda::CUDAGuard guard(call.x.device());
  if (call.out.numel() == 0) return;
  const ConvArgs& a = call.args;
  switch (kernel) {
    case ConvKernel::kCutlassSm90: {
#ifdef RESNET_FUSED_SM90
      const int64_t bytes = conv::conv_sm90_workspace(a);
      TORCH_CHECK(bytes >= 0, "conv_bn_act: the CUTLASS kernel refused the problem");
      const at::Tensor workspace = at::empty({bytes}, call.x.options().dtype(at::kByte));
      conv::conv_sm90(a, bytes > 0 ? workspace.mutable_data_ptr() : nullptr);
#endif
      return;
    }
    case ConvKernel::kMmaSm80: {
      // Large tiles once they fill the GPU, else small ones for more blocks.
      const int64_t large_tiles = conv::ceil_div(a.problem.gemm_m(), conv::kLargeTile.block_m) *
                                  conv::ceil_div(a.problem.k, conv::kLargeTile.block_n);
      const bool large = large_tiles >= multiprocessors(call.x.get_device());
      return conv::conv_mma_sm80(a, large ? conv::kLargeTile : conv::kSmallTile);
    }
    case ConvKernel::kDirect: return conv::conv_direct(a);
  }
}

at::Tensor finish(const Call& call, const at::Tensor& x_in) {
  return call.out.contiguous(output_memory_format(x_in));
}

}  // namespace

at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool relu) {
  Call call = prepare(x, weight, bias, residual, stride, padding, dilation, groups, relu);
  run(choose(call), call);
  return finish(call, x);
}

at::Tensor conv_bn_act_with_kernel(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, bool relu, c10::string_view kernel_name_in) {
  Call call = prepare(x, weight, bias, residual, stride, padding, dilation, groups, relu);
  const ConvKernel kernel = parse_kernel(kernel_name_in);
  const char* why = refusal(kernel, call);
  TORCH_CHECK(why == nullptr, "conv_bn_act: the ", kernel_name(kernel), " kernel cannot run this call: ", why);
  run(kernel, call);
  return finish(call, x);
}

std::string conv_kernel_for(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Call call = prepare(x, weight, bias, residual, stride, padding, dilation, groups, /*relu=*/true);
  return kernel_name(choose(call));
}

}  // namespace resnet_fused::cuda
