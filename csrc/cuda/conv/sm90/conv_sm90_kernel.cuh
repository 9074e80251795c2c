// One CUTLASS 3.x Hopper conv fprop with conv_bn_act's epilogue, as a template on the element type and the
// tile's N extent (tile M from tile_m_for): TMA im2col loads of the NHWC activation (A, GEMM M = N*P*Q), TMA loads of the KRSC
// filter (B, GEMM N = K), wgmma, one producer and one consumer warp group (CUTLASS's only conv schedule,
// KernelImplicitTmaWarpSpecializedSm90). The epilogue is CUTLASS's LinCombPerColBiasEltAct:
//   out = act(alpha * acc + beta * C + bias[k]),  alpha = 1, C = the residual with beta = 1 (beta = 0 and
//   C never read without one), act = LeakyReLU with slope 0 (ReLU) or 1 (identity), so one instantiation
//   serves relu on and off.
// Each instantiation lives in its own translation unit (conv_sm90_<dtype>_n<N>.cu) so they compile in
// parallel; this header never meets torch's headers. Built for sm_90a only: on other targets CUTLASS
// compiles the kernel body out, and the host never launches it there (conv_dispatch.cpp checks the device).
#pragma once

#include <type_traits>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"  // before the conv headers (ENV.md)
#include "cute/tensor.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"

#include "../conv_launch.h"
#include "conv_sm90.h"

namespace resnet_fused::cuda::conv::sm90 {

// ReLU when Arguments::relu, else the identity: `v < 0 ? 0 : v` as torch.relu (NaN passes, -inf and -0 give
// +0). CUTLASS's LeakyReLU with slope 0 would turn -inf into NaN (-inf * 0) and negatives into -0.
template <class T>
struct ReluIf {
  static constexpr bool kIsHeavy = false;
  struct Arguments {
    bool relu = true;
  };
  CUTLASS_HOST_DEVICE T operator()(T const& v, Arguments const& args) const {
    return args.relu && v < T(0) ? T(0) : v;
  }
};

template <class T, int N>
struct ReluIf<cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = false;
  using Arguments = typename ReluIf<T>::Arguments;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v, Arguments const& args) const {
    cutlass::Array<T, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = ReluIf<T>{}(v[i], args);
    return out;
  }
};

template <DType kDType>
using ElementOf = std::conditional_t<kDType == DType::kHalf, cutlass::half_t, cutlass::bfloat16_t>;

template <DType kDType, int kTileN>
struct Kernel {
  static_assert(kDType == DType::kHalf || kDType == DType::kBFloat16, "the Hopper kernels take float16/bfloat16");
  using Element = ElementOf<kDType>;
  using Acc = float;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA alignment
  using TileShape = cute::Shape<cute::Int<tile_m_for(kTileN)>, cute::Int<kTileN>, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using FusionOp = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<ReluIf, Element,
                                                                       Acc, Element, Element, Acc>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, Element, cutlass::layout::TensorNHWC, kAlign,
      Element, cutlass::layout::TensorNHWC, kAlign, cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element,
      cutlass::layout::TensorNHWC, kAlign, Element, cutlass::layout::TensorNHWC, kAlign, Acc, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using ProblemShape =
      cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<
      cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>>;

  static typename Conv::Arguments arguments(const ConvArgs& a) {
    const Problem& p = a.problem;
    // Symmetric padding: CUTLASS derives P and Q from lower + upper padding with the same floor as F.conv2d.
    ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation, {p.n, p.h, p.w, p.c}, {p.k, p.r, p.s, p.c},
                       {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w}, {p.dil_h, p.dil_w}, 1);
    typename Conv::ConvKernel::StrideC stride_out{};
    cute::for_each(cute::make_seq<cute::rank<0>(typename Conv::ConvKernel::StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_out) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    auto* out = static_cast<Element*>(a.out);
    const auto* residual = static_cast<const Element*>(a.residual);
    typename Conv::Arguments args{
        shape,
        {static_cast<const Element*>(a.x), static_cast<const Element*>(a.weight)},
        {{}, residual ? residual : out, stride_out, out, stride_out}};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.f;
    fusion.beta = residual ? 1.f : 0.f;
    fusion.bias_ptr = static_cast<const Element*>(a.bias);  // null: no bias (CUTLASS adds 0)
    fusion.activation.relu = a.relu;
    return args;
  }

  static int64_t workspace(const ConvArgs& a) {
    // TMA im2col takes traversal strides of at most 8 (cuTensorMapEncodeIm2col's elementStrides) and no
    // empty extent; can_implement checks neither, and with -DNDEBUG a failed encode would go unnoticed.
    if (a.problem.stride_h > 8 || a.problem.stride_w > 8 || a.problem.c == 0 || a.problem.k == 0) return -1;
    const auto args = arguments(a);
    if (Conv::can_implement(args) != cutlass::Status::kSuccess) return -1;
    return static_cast<int64_t>(Conv::get_workspace_size(args));
  }

  static Status run(const ConvArgs& a, void* workspace) {
    Conv op;
    const auto args = arguments(a);
    if (op.initialize(args, workspace, a.stream) != cutlass::Status::kSuccess) return Status::kInitializeFailed;
    return op.run(a.stream) == cutlass::Status::kSuccess ? Status::kOk : Status::kLaunchFailed;
  }
};

}  // namespace resnet_fused::cuda::conv::sm90

// One instantiation per translation unit: RF_SM90_INSTANTIATE(kBFloat16, 128) defines the two entry points
// conv_sm90.h declares for that dtype and tile.
#define RF_SM90_INSTANTIATE(DTYPE, TILE_N)                                                                    \
  namespace resnet_fused::cuda::conv::sm90 {                                                                 \
  template <>                                                                                                \
  int64_t workspace<DType::DTYPE, TILE_N>(const ConvArgs& a) {                                               \
    return Kernel<DType::DTYPE, TILE_N>::workspace(a);                                                       \
  }                                                                                                          \
  template <>                                                                                                \
  Status run<DType::DTYPE, TILE_N>(const ConvArgs& a, void* ws) { return Kernel<DType::DTYPE, TILE_N>::run(a, ws); } \
  }
