// CUDA kernels of the resnet_fused ops; registered in register_cuda.cpp. The .cu files include only
// light headers (see ENV.md: the full torch headers cost minutes of nvcc time per file).
#pragma once

#include <ATen/core/Tensor.h>

namespace resnet_fused::cuda {

// out = act(x + residual); all three contiguous in one memory format, same dtype and device.
void add_act_launch(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& out, bool relu);

}  // namespace resnet_fused::cuda
