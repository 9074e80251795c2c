// The CUTLASS Hopper conv instantiations (conv_sm90_kernel.cuh), declared without CUTLASS's headers so the
// dispatcher (conv_dispatch.cpp) can call them. One specialization per (dtype, tile N) is defined, each in
// its own translation unit (conv_sm90_<dtype>_n<N>.cu): tile N 64, 128 and 256, tile K 64.
#pragma once

#include <cstdint>

#include "../conv_launch.h"

namespace resnet_fused::cuda::conv::sm90 {

enum class Status { kOk, kInitializeFailed, kLaunchFailed };

// Tile M for a tile N: the one consumer warp group holds the whole fp32 accumulator in registers, so
// tile M x tile N / 128 threads must stay at 128 values per thread or less (128 x 256 spills: 255
// registers and a 1.8 KB stack, seen in the build's resource usage).
constexpr int tile_m_for(int tile_n) { return tile_n >= 256 ? 64 : 128; }

// -1 where CUTLASS's can_implement refuses the problem, else the workspace bytes run() needs.
template <DType kDType, int kTileN>
int64_t workspace(const ConvArgs& args);

template <DType kDType, int kTileN>
Status run(const ConvArgs& args, void* workspace);

// The specializations that exist, one per conv_sm90_<dtype>_n<N>.cu.
#define RF_SM90_DECLARE(DTYPE, TILE_N)                                  \
  template <>                                                           \
  int64_t workspace<DType::DTYPE, TILE_N>(const ConvArgs& args);        \
  template <>                                                           \
  Status run<DType::DTYPE, TILE_N>(const ConvArgs& args, void* workspace);
RF_SM90_DECLARE(kHalf, 64)
RF_SM90_DECLARE(kHalf, 128)
RF_SM90_DECLARE(kHalf, 256)
RF_SM90_DECLARE(kBFloat16, 64)
RF_SM90_DECLARE(kBFloat16, 128)
RF_SM90_DECLARE(kBFloat16, 256)
#undef RF_SM90_DECLARE

}  // namespace resnet_fused::cuda::conv::sm90
