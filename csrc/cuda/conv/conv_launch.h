// The launchers of the CUDA conv_bn_act kernels: plain pointers and sizes, no torch headers, so the CUTLASS
// translation units never see torch's and each kernel family rebuilds alone. conv_dispatch.cpp checks the
// tensors, picks a kernel and calls one of these on the current stream.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_geometry.h"

namespace resnet_fused::cuda::conv {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// One conv_bn_act call: x NHWC, weight OHWI, residual and out NHWC, all contiguous, of `dtype`; bias
// [K] of `dtype`; bias and residual may be null. groups divides C and K (the tensor-core kernels take 1).
struct ConvArgs {
  Problem problem;
  int32_t groups;
  DType dtype;
  const void* x;
  const void* weight;
  const void* bias;
  const void* residual;
  void* out;
  bool relu;
  cudaStream_t stream;
};

// Direct convolution, one thread per output element, accumulating in float (double for float64): any
// shape, groups, dilation and dtype; the correct fallback (conv_direct.cu).
void conv_direct(const ConvArgs& args);

// Tensor-core implicit GEMM with mma.sync (sm_80 and later), float16/bfloat16, groups 1, C and K
// multiples of 8, M < 2^31, 16-byte aligned pointers (conv_mma_sm80.cu). `tile` is kLargeTile or kSmallTile.
void conv_mma_sm80(const ConvArgs& args, const TileShape& tile);

// CUTLASS's Hopper implicit-GEMM conv (TMA im2col, wgmma) with the epilogue act(acc + bias + residual),
// float16/bfloat16, groups 1, on compute capability 9.0 (sm90/; built only when RESNET_FUSED_SM90 is
// defined, i.e. sm_90a is among the build's architectures). conv_sm90_workspace returns -1 where CUTLASS's
// can_implement refuses the problem, else the workspace bytes conv_sm90 needs.
int64_t conv_sm90_workspace(const ConvArgs& args);
void conv_sm90(const ConvArgs& args, void* workspace);

}  // namespace resnet_fused::cuda::conv
