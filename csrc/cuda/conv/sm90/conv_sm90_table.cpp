// The Hopper dispatch table: which CUTLASS instantiation (conv_sm90_<dtype>_n<N>.cu) runs a problem. Tile N
// follows the output channels, so ResNet's 64-channel convs do not compute half-empty 128-wide tiles and
// its 256- to 2048-channel convs get the widest tile (64 x 256; tile_m_for in conv_sm90.h says why).
#include <c10/util/Exception.h>

#include "conv_sm90.h"

namespace resnet_fused::cuda::conv {
namespace {

int tile_n_for(int32_t k) {
  if (k <= 64) return 64;
  if (k <= 128 || k % 256 != 0) return 128;
  return 256;
}

template <DType kDType, typename Fn>
auto with_tile(int tile_n, Fn&& fn) {
  switch (tile_n) {
    case 64: return fn(sm90::workspace<kDType, 64>, sm90::run<kDType, 64>);
    case 128: return fn(sm90::workspace<kDType, 128>, sm90::run<kDType, 128>);
    default: return fn(sm90::workspace<kDType, 256>, sm90::run<kDType, 256>);
  }
}

template <typename Fn>
auto with_instantiation(const ConvArgs& a, Fn&& fn) {
  const int tile_n = tile_n_for(a.problem.k);
  TORCH_CHECK(a.dtype == DType::kHalf || a.dtype == DType::kBFloat16,
              "conv_bn_act: the Hopper kernels take float16 and bfloat16 only");
  return a.dtype == DType::kHalf ? with_tile<DType::kHalf>(tile_n, fn) : with_tile<DType::kBFloat16>(tile_n, fn);
}

}  // namespace

int64_t conv_sm90_workspace(const ConvArgs& args) {
  return with_instantiation(args, [&](auto workspace, auto) { return workspace(args); });
}

void conv_sm90(const ConvArgs& args, void* workspace) {
  const sm90::Status status = with_instantiation(args, [&](auto, auto run) { return run(args, workspace); });
  TORCH_CHECK(status != sm90::Status::kInitializeFailed, "conv_bn_act: CUTLASS could not initialize the Hopper conv");
  TORCH_CHECK(status != sm90::Status::kLaunchFailed, "conv_bn_act: the Hopper conv failed to launch");
}

}  // namespace resnet_fused::cuda::conv
