// The correct fallback of conv_bn_act on CUDA: a direct convolution, one thread per output element, for
// every shape the op accepts (groups, dilation, odd channel counts) and every dtype, accumulating in
// float (double for float64). The tensor-core kernels take the common case; this one makes sure that
// nothing they refuse gets a wrong answer.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "conv_launch.h"

namespace resnet_fused::cuda::conv {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    conv_direct_kernel(Problem pr, int32_t groups, const T* __restrict__ x, const T* __restrict__ weight,
                       const T* __restrict__ bias, const T* __restrict__ residual, T* __restrict__ out,
                       bool relu) {
  const int32_t c_per_group = pr.c / groups, k_per_group = pr.k / groups;
  Problem filter = pr;  // the weight's channel extent is C / groups
  filter.c = c_per_group;
  const int64_t total = pr.gemm_m() * pr.k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t k = static_cast<int32_t>(i % pr.k);
    const int64_t m = i / pr.k;
    const Pixel px = output_pixel(pr, static_cast<int32_t>(m));
    const int32_t c_begin = (k / k_per_group) * c_per_group;
    Acc acc = 0;
    for (int32_t r = 0; r < pr.r; ++r) {
      for (int32_t s = 0; s < pr.s; ++s) {
        const int64_t x_tap = activation_offset(pr, px, r, s, c_begin);
        if (x_tap < 0) continue;  // the tap is in the padding
        const int64_t w_tap = filter_offset(filter, k, r, s, 0);
        for (int32_t c = 0; c < c_per_group; ++c) {
          acc += static_cast<Acc>(x[x_tap + c]) * static_cast<Acc>(weight[w_tap + c]);
        }
      }
    }
    const Acc b = bias ? static_cast<Acc>(bias[k]) : Acc(0);
    const Acc res = residual ? static_cast<Acc>(residual[output_offset(pr, m, k)]) : Acc(0);
    out[output_offset(pr, m, k)] = static_cast<T>(epilogue_value(acc, b, res, relu));
  }
}

template <typename T, typename Acc>
void launch(const ConvArgs& a) {
  const int64_t total = a.problem.gemm_m() * a.problem.k;
  if (total == 0) return;
  const int64_t blocks = ceil_div(total, kThreads) < 65535 * 32 ? ceil_div(total, kThreads) : 65535 * 32;
  conv_direct_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, a.stream>>>(
      a.problem, a.groups, static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
      static_cast<const T*>(a.bias), static_cast<const T*>(a.residual), static_cast<T*>(a.out), a.relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void conv_direct(const ConvArgs& args) {
  switch (args.dtype) {
    case DType::kHalf: return launch<c10::Half, float>(args);
    case DType::kBFloat16: return launch<c10::BFloat16, float>(args);
    case DType::kFloat: return launch<float, float>(args);
    case DType::kDouble: return launch<double, double>(args);
  }
}

}  // namespace resnet_fused::cuda::conv
