// bn_act and bn_act_backward on CUDA: training-mode batch norm + residual + ReLU, forward and backward.
//
// Forward (training): one read pass of x for per-channel Welford statistics, a partial per tile and
// channel (bn_stats_*), a finalize that combines the partials per channel in a fixed order and updates
// the running statistics (bn_forward_finalize), then one elementwise pass out = act(x * scale + shift + r)
// (bn_forward_*). Eval: the finalize reads the running statistics, then the same elementwise pass.
// Backward: one read pass for sum(g) and sum(g * (x - mean)) with the ReLU mask (bn_backward_reduce_*),
// a finalize (bn_backward_finalize), and one elementwise pass writing grad_x and grad_pre
// (bn_backward_*). The partition and the statistics math live in bn_act_plan.h.
//
// NHWC is the fast path: rows of C contiguous channels, 16-byte vectors along C. NCHW walks each channel's
// planes with 16-byte vectors along the pixels when H*W allows. float64 runs the scalar path.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "bn_act_plan.h"
#include "kernels.h"

namespace resnet_fused::cuda {
namespace {

using bn::kThreads;
using bn::PlaneCursor;
using bn::TilePlan;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vec {
  scalar_t v[kVec];
};

template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[kVec]) {
  const auto v = *reinterpret_cast<const Vec<scalar_t, kVec>*>(p);
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = static_cast<acc_t>(v.v[k]);
}

template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[kVec]) {
  Vec<scalar_t, kVec> v;
#pragma unroll
  for (int k = 0; k < kVec; ++k) v.v[k] = static_cast<scalar_t>(in[k]);
  *reinterpret_cast<Vec<scalar_t, kVec>*>(p) = v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu_if(acc_t v, bool relu) {
  return relu && v < acc_t(0) ? acc_t(0) : v;  // NaN passes, as in torch.relu
}

// The gradient reaching the pre-activation: ReLU passes it where the output is positive.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_mask(acc_t g, acc_t y, bool relu) {
  return relu && !(y > acc_t(0)) ? acc_t(0) : g;
}

// Folds the Welford states of the threads sharing threadIdx.x into threadIdx.y == 0, by a fixed tree
// (y absorbs y + half). blockDim.y is a power of two; the block has kThreads threads.
template <typename acc_t, int kVec>
__device__ __forceinline__ void welford_over_y(acc_t (&mean)[kVec], acc_t (&m2)[kVec], int64_t& n) {
  __shared__ acc_t s_mean[kVec][kThreads];
  __shared__ acc_t s_m2[kVec][kThreads];
  __shared__ int64_t s_n[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y >= half && threadIdx.y < 2 * half) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        s_mean[k][tid] = mean[k];
        s_m2[k][tid] = m2[k];
      }
      s_n[tid] = n;
    }
    __syncthreads();
    if (threadIdx.y < half) {
      const int other = tid + half * blockDim.x;
      const int64_t n_b = s_n[other];
#pragma unroll
      for (int k = 0; k < kVec; ++k) bn::chan_combine(mean[k], m2[k], n, s_mean[k][other], s_m2[k][other], n_b);
      n += n_b;
    }
    __syncthreads();
  }
}

// Sums two per-thread quantities over threadIdx.y into threadIdx.y == 0, by the same fixed tree.
template <typename acc_t, int kVec>
__device__ __forceinline__ void sum_over_y(acc_t (&a)[kVec], acc_t (&b)[kVec]) {
  __shared__ acc_t s_a[kVec][kThreads];
  __shared__ acc_t s_b[kVec][kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y >= half && threadIdx.y < 2 * half) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        s_a[k][tid] = a[k];
        s_b[k][tid] = b[k];
      }
    }
    __syncthreads();
    if (threadIdx.y < half) {
      const int other = tid + half * blockDim.x;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        a[k] += s_a[k][other];
        b[k] += s_b[k][other];
      }
    }
    __syncthreads();
  }
}

// The NHWC reductions' write-back: row 0 of the block stores the pair (a, b) of each of its kVec channels as
// the partials of `tile`, channel-major ([channel][tile]), for the finalize kernels.
template <typename acc_t, int kVec>
__device__ __forceinline__ void store_partials(const TilePlan& plan, int64_t c0, int64_t tile, const acc_t (&a)[kVec],
                                               const acc_t (&b)[kVec], acc_t* __restrict__ partial_a,
                                               acc_t* __restrict__ partial_b) {
  if (threadIdx.y != 0 || c0 >= plan.channels) return;
  const int64_t tiles = plan.tiles();
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    partial_a[(c0 + k) * tiles + tile] = a[k];
    partial_b[(c0 + k) * tiles + tile] = b[k];
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward statistics: one partial (mean, m2) per tile and channel, stored at [channel][tile].

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_stats_nhwc_kernel(const TilePlan plan, const scalar_t* __restrict__ x,
                         at::opmath_type<scalar_t>* __restrict__ partial_mean,
                         at::opmath_type<scalar_t>* __restrict__ partial_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = plan.channels, tile = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int64_t row_end = ::min(plan.rows, (tile + 1) * plan.rows_per_tile);
  acc_t mean[kVec], m2[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) mean[k] = m2[k] = acc_t(0);
  int64_t n = 0;
  if (c0 < channels) {
#pragma unroll 4
    for (int64_t row = tile * plan.rows_per_tile + threadIdx.y; row < row_end; row += blockDim.y) {
      acc_t v[kVec];
      load_vec<kVec>(x + row * channels + c0, v);
      ++n;
      const acc_t inv_n = bn::reciprocal(static_cast<acc_t>(n));
#pragma unroll
      for (int k = 0; k < kVec; ++k) bn::welford_add(mean[k], m2[k], v[k], inv_n);
    }
  }
  welford_over_y<acc_t, kVec>(mean, m2, n);
  store_partials<acc_t, kVec>(plan, c0, tile, mean, m2, partial_mean, partial_m2);
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_stats_nchw_kernel(const TilePlan plan, const scalar_t* __restrict__ x,
                         at::opmath_type<scalar_t>* __restrict__ partial_mean,
                         at::opmath_type<scalar_t>* __restrict__ partial_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channel = blockIdx.x, tile = blockIdx.y;
  acc_t mean[1] = {acc_t(0)}, m2[1] = {acc_t(0)};
  int64_t n = 0;
  for (auto q = PlaneCursor::start(plan, tile, channel, threadIdx.y, blockDim.y); q.valid(); q.advance()) {
    acc_t v[kVec];
    load_vec<kVec>(x + q.offset, v);
    if constexpr (kVec == 1) {
      ++n;
      bn::welford_add(mean[0], m2[0], v[0], bn::reciprocal(static_cast<acc_t>(n)));
    } else {
      acc_t v_mean, v_m2;
      bn::local_stats(v, kVec, v_mean, v_m2);
      bn::chan_combine(mean[0], m2[0], n, v_mean, v_m2, kVec);
      n += kVec;
    }
  }
  welford_over_y<acc_t, 1>(mean, m2, n);
  if (threadIdx.y == 0) {
    partial_mean[channel * plan.tiles() + tile] = mean[0];
    partial_m2[channel * plan.tiles() + tile] = m2[0];
  }
}

// Per channel: combines the partials (training) or reads the running statistics (eval); writes
// save_mean/save_invstd, the new running statistics, and the (scale, shift) of the elementwise pass.
// One warp per channel: lane l folds tiles l, l + 32, ... in order, then a fixed shuffle tree.
template <typename acc_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    bn_forward_finalize_kernel(const TilePlan plan, const acc_t* __restrict__ partial_mean,
                               const acc_t* __restrict__ partial_m2, const param_t* __restrict__ weight,
                               const param_t* __restrict__ bias, const param_t* __restrict__ running_mean,
                               const param_t* __restrict__ running_var, bool training, double momentum,
                               double eps, acc_t* __restrict__ save_mean, acc_t* __restrict__ save_invstd,
                               param_t* __restrict__ new_running_mean, param_t* __restrict__ new_running_var,
                               acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * bn::kFinalizeWarps + threadIdx.y;
  const int lane = threadIdx.x;
  if (channel >= plan.channels) return;  // whole warps: the shuffles below stay full-warp
  const int64_t tiles = training ? plan.tiles() : 0;
  acc_t mean = 0, m2 = 0;
  int64_t n = 0;
#pragma unroll 4
  for (int64_t g = lane; g < tiles; g += 32) {
    const int64_t n_g = plan.tile_count(g);
    bn::chan_combine(mean, m2, n, partial_mean[channel * tiles + g], partial_m2[channel * tiles + g], n_g);
    n += n_g;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const acc_t mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
    const acc_t m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
    const int64_t n_b = __shfl_down_sync(0xffffffffu, n, offset);
    bn::chan_combine(mean, m2, n, mean_b, m2_b, n_b);
    n += n_b;
  }
  if (lane != 0) return;
  const double rm = static_cast<double>(running_mean[channel]), rv = static_cast<double>(running_var[channel]);
  acc_t batch_mean, invstd;
  if (training && n > 0) {
    batch_mean = mean;
    invstd = static_cast<acc_t>(bn::inverse_std(bn::biased_variance(m2, n), eps));
    new_running_mean[channel] = static_cast<param_t>(bn::running_update(rm, mean, momentum));
    new_running_var[channel] = static_cast<param_t>(bn::running_update(rv, bn::unbiased_variance(m2, n), momentum));
  } else {
    // Eval: the running statistics. An empty batch in training: zeros, running statistics unchanged.
    batch_mean = training ? acc_t(0) : static_cast<acc_t>(running_mean[channel]);
    invstd = training ? acc_t(0) : static_cast<acc_t>(bn::inverse_std(rv, eps));
    new_running_mean[channel] = running_mean[channel];
    new_running_var[channel] = running_var[channel];
  }
  save_mean[channel] = batch_mean;
  save_invstd[channel] = invstd;
  const acc_t a = static_cast<acc_t>(weight[channel]) * invstd;
  scale[channel] = a;
  shift[channel] = static_cast<acc_t>(bias[channel]) - batch_mean * a;
}

// ---------------------------------------------------------------------------------------------------
// Forward elementwise: out = act(x * scale + shift + residual).

template <int kVec, typename acc_t, typename scalar_t>
__device__ __forceinline__ void forward_element(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                                scalar_t* __restrict__ out, int64_t offset, const acc_t (&a)[kVec],
                                                const acc_t (&b)[kVec], bool relu) {
  acc_t v[kVec];
  load_vec<kVec>(x + offset, v);
#pragma unroll
  for (int k = 0; k < kVec; ++k) v[k] = v[k] * a[k] + b[k];
  if (residual != nullptr) {
    acc_t r[kVec];
    load_vec<kVec>(residual + offset, r);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] += r[k];
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) v[k] = relu_if(v[k], relu);
  store_vec<kVec>(out + offset, v);
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_forward_nhwc_kernel(const TilePlan plan, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ residual,
                           const at::opmath_type<scalar_t>* __restrict__ scale,
                           const at::opmath_type<scalar_t>* __restrict__ shift, scalar_t* __restrict__ out,
                           bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = plan.channels, tile = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c0 >= channels) return;
  acc_t a[kVec], b[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    a[k] = scale[c0 + k];
    b[k] = shift[c0 + k];
  }
  const int64_t row_end = ::min(plan.rows, (tile + 1) * plan.rows_per_tile);
#pragma unroll 2
  for (int64_t row = tile * plan.rows_per_tile + threadIdx.y; row < row_end; row += blockDim.y) {
    forward_element<kVec>(x, residual, out, row * channels + c0, a, b, relu);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_forward_nchw_kernel(const TilePlan plan, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ residual,
                           const at::opmath_type<scalar_t>* __restrict__ scale,
                           const at::opmath_type<scalar_t>* __restrict__ shift, scalar_t* __restrict__ out,
                           bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channel = blockIdx.x;
  acc_t a[kVec], b[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    a[k] = scale[channel];
    b[k] = shift[channel];
  }
  for (auto q = PlaneCursor::start(plan, blockIdx.y, channel, threadIdx.y, blockDim.y); q.valid(); q.advance()) {
    forward_element<kVec>(x, residual, out, q.offset, a, b, relu);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward reduction: partial sum(g) and sum(g * (x - mean)) per tile and channel, g the masked gradient.

template <int kVec, typename acc_t, typename scalar_t>
__device__ __forceinline__ void backward_terms(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                               const scalar_t* __restrict__ x, int64_t offset, bool relu,
                                               acc_t (&g)[kVec], acc_t (&xv)[kVec]) {
  load_vec<kVec>(grad_out + offset, g);
  load_vec<kVec>(x + offset, xv);
  if (relu) {
    acc_t y[kVec];
    load_vec<kVec>(out + offset, y);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = relu_mask(g[k], y[k], relu);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_backward_reduce_nhwc_kernel(const TilePlan plan, const scalar_t* __restrict__ grad_out,
                                   const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                   const at::opmath_type<scalar_t>* __restrict__ save_mean, bool relu,
                                   at::opmath_type<scalar_t>* __restrict__ partial_g,
                                   at::opmath_type<scalar_t>* __restrict__ partial_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = plan.channels, tile = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int64_t row_end = ::min(plan.rows, (tile + 1) * plan.rows_per_tile);
  acc_t sum_g[kVec], sum_gx[kVec], mean[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    sum_g[k] = sum_gx[k] = acc_t(0);
    mean[k] = c0 < channels ? save_mean[c0 + k] : acc_t(0);
  }
  if (c0 < channels) {
#pragma unroll 2
    for (int64_t row = tile * plan.rows_per_tile + threadIdx.y; row < row_end; row += blockDim.y) {
      acc_t g[kVec], xv[kVec];
      backward_terms<kVec>(grad_out, out, x, row * channels + c0, relu, g, xv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        sum_g[k] += g[k];
        sum_gx[k] += g[k] * (xv[k] - mean[k]);
      }
    }
  }
  sum_over_y<acc_t, kVec>(sum_g, sum_gx);
  store_partials<acc_t, kVec>(plan, c0, tile, sum_g, sum_gx, partial_g, partial_gx);
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_backward_reduce_nchw_kernel(const TilePlan plan, const scalar_t* __restrict__ grad_out,
                                   const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                   const at::opmath_type<scalar_t>* __restrict__ save_mean, bool relu,
                                   at::opmath_type<scalar_t>* __restrict__ partial_g,
                                   at::opmath_type<scalar_t>* __restrict__ partial_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channel = blockIdx.x, tile = blockIdx.y;
  const acc_t mean = save_mean[channel];
  acc_t sum_g[1] = {acc_t(0)}, sum_gx[1] = {acc_t(0)};
  for (auto q = PlaneCursor::start(plan, tile, channel, threadIdx.y, blockDim.y); q.valid(); q.advance()) {
    acc_t g[kVec], xv[kVec];
    backward_terms<kVec>(grad_out, out, x, q.offset, relu, g, xv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      sum_g[0] += g[k];
      sum_gx[0] += g[k] * (xv[k] - mean);
    }
  }
  sum_over_y<acc_t, 1>(sum_g, sum_gx);
  if (threadIdx.y == 0) {
    partial_g[channel * plan.tiles() + tile] = sum_g[0];
    partial_gx[channel * plan.tiles() + tile] = sum_gx[0];
  }
}

// Per channel: grad_bias = sum(g), grad_weight = invstd * sum(g * (x - mean)) = sum(g * xhat), and the
// coefficients of grad_x = a * (g - mean(g) - xhat * mean(g * xhat)), a = weight * invstd, written as
// a * g - a * mean(g) - (x - mean) * (a * invstd * mean(g * xhat)); the mean terms only in training, where
// the batch statistics depend on x. One warp per channel, as in the forward finalize.
template <typename acc_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    bn_backward_finalize_kernel(const TilePlan plan, const acc_t* __restrict__ partial_g,
                                const acc_t* __restrict__ partial_gx, const param_t* __restrict__ weight,
                                const acc_t* __restrict__ save_invstd, bool training,
                                param_t* __restrict__ grad_weight, param_t* __restrict__ grad_bias,
                                acc_t* __restrict__ coef) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * bn::kFinalizeWarps + threadIdx.y;
  const int lane = threadIdx.x;
  if (channel >= plan.channels) return;
  const int64_t tiles = plan.tiles();
  acc_t sum_g = 0, sum_gx = 0;
#pragma unroll 4
  for (int64_t g = lane; g < tiles; g += 32) {
    sum_g += partial_g[channel * tiles + g];
    sum_gx += partial_gx[channel * tiles + g];
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum_g += __shfl_down_sync(0xffffffffu, sum_g, offset);
    sum_gx += __shfl_down_sync(0xffffffffu, sum_gx, offset);
  }
  if (lane != 0) return;
  const acc_t invstd = save_invstd[channel];
  const acc_t sum_gxhat = sum_gx * invstd;
  grad_bias[channel] = static_cast<param_t>(sum_g);
  grad_weight[channel] = static_cast<param_t>(sum_gxhat);
  const int64_t count = plan.count();
  const bool centered = training && count > 0;
  const int64_t channels = plan.channels;
  const acc_t a = static_cast<acc_t>(weight[channel]) * invstd;
  coef[channel] = a;
  coef[channels + channel] = centered ? a * (sum_g / static_cast<acc_t>(count)) : acc_t(0);
  coef[2 * channels + channel] = centered ? a * invstd * (sum_gxhat / static_cast<acc_t>(count)) : acc_t(0);
}

// ---------------------------------------------------------------------------------------------------
// Backward elementwise: grad_x and grad_pre (the masked gradient, also the residual's).

// grad_x = a * g - shift - (x - mean) * slope, per channel (see bn_backward_finalize_kernel).
template <typename acc_t, int kVec>
struct BackwardCoef {
  acc_t mean[kVec], a[kVec], shift[kVec], slope[kVec];

  __device__ __forceinline__ void load(const acc_t* save_mean, const acc_t* coef, int64_t channels, int64_t c0,
                                       int stride) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t c = c0 + k * stride;
      mean[k] = save_mean[c];
      a[k] = coef[c];
      shift[k] = coef[channels + c];
      slope[k] = coef[2 * channels + c];
    }
  }
};

template <int kVec, typename acc_t, typename scalar_t>
__device__ __forceinline__ void backward_element(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                                 const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_x,
                                                 scalar_t* __restrict__ grad_pre, int64_t offset,
                                                 const BackwardCoef<acc_t, kVec>& p, bool relu) {
  acc_t g[kVec], xv[kVec], gx[kVec];
  backward_terms<kVec>(grad_out, out, x, offset, relu, g, xv);
#pragma unroll
  for (int k = 0; k < kVec; ++k) gx[k] = p.a[k] * g[k] - p.shift[k] - (xv[k] - p.mean[k]) * p.slope[k];
  store_vec<kVec>(grad_x + offset, gx);
  store_vec<kVec>(grad_pre + offset, g);
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_backward_nhwc_kernel(const TilePlan plan, const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                            const at::opmath_type<scalar_t>* __restrict__ save_mean,
                            const at::opmath_type<scalar_t>* __restrict__ coef, bool relu,
                            scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = plan.channels, tile = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c0 >= channels) return;
  BackwardCoef<acc_t, kVec> p;
  p.load(save_mean, coef, channels, c0, 1);
  const int64_t row_end = ::min(plan.rows, (tile + 1) * plan.rows_per_tile);
  for (int64_t row = tile * plan.rows_per_tile + threadIdx.y; row < row_end; row += blockDim.y) {
    backward_element<kVec>(grad_out, out, x, grad_x, grad_pre, row * channels + c0, p, relu);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    bn_backward_nchw_kernel(const TilePlan plan, const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                            const at::opmath_type<scalar_t>* __restrict__ save_mean,
                            const at::opmath_type<scalar_t>* __restrict__ coef, bool relu,
                            scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channel = blockIdx.x;
  BackwardCoef<acc_t, kVec> p;
  p.load(save_mean, coef, plan.channels, channel, 0);  // one channel for the whole vector
  for (auto q = PlaneCursor::start(plan, blockIdx.y, channel, threadIdx.y, blockDim.y); q.valid(); q.advance()) {
    backward_element<kVec>(grad_out, out, x, grad_x, grad_pre, q.offset, p, relu);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers.

dim3 tile_grid(const TilePlan& plan) {
  TORCH_INTERNAL_ASSERT(plan.tiles() <= bn::kMaxGridY && plan.bands <= INT32_MAX, "bn_act: grid too large");
  return dim3(static_cast<unsigned>(plan.bands), static_cast<unsigned>(plan.tiles()));
}

dim3 tile_block(const TilePlan& plan) { return dim3(plan.block_x, plan.block_y); }

dim3 finalize_grid(const TilePlan& plan) {
  return dim3(static_cast<unsigned>(bn::ceil_div(plan.channels, bn::kFinalizeWarps)));
}

const dim3 kFinalizeBlock(32, bn::kFinalizeWarps);

// Calls f(std::integral_constant<int, kVec>) for the plan's vector width: 16 bytes, or 1 (the scalar
// path: odd C or H*W, misaligned views, float64).
template <typename scalar_t, typename F>
void with_vector_width(const TilePlan& plan, const F& f) {
  constexpr int kVec = sizeof(scalar_t) >= 8 ? 1 : 16 / sizeof(scalar_t);
  if (plan.vec == kVec) {
    f(std::integral_constant<int, kVec>());
  } else {
    TORCH_INTERNAL_ASSERT(plan.vec == 1, "bn_act: unexpected vector width ", plan.vec);
    f(std::integral_constant<int, 1>());
  }
}

}  // namespace

void bn_act_forward_launch(const bn::TilePlan& reduce, const bn::TilePlan& elementwise, const at::Tensor& x,
                           const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& running_mean, const at::Tensor& running_var, bool training,
                           double momentum, double eps, bool relu, const at::Tensor& out,
                           const at::Tensor& save_mean, const at::Tensor& save_invstd,
                           const at::Tensor& new_running_mean, const at::Tensor& new_running_var,
                           const at::Tensor& workspace) {
  if (reduce.channels == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* ws = workspace.mutable_data_ptr<acc_t>();
    const int64_t partials = training ? reduce.channels * reduce.tiles() : 0;
    acc_t* partial_mean = ws;
    acc_t* partial_m2 = ws + partials;
    acc_t* scale = ws + 2 * partials;
    acc_t* shift = scale + reduce.channels;

    if (training && reduce.tiles() > 0) {
      with_vector_width<scalar_t>(reduce, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        if (reduce.channels_last) {
          bn_stats_nhwc_kernel<scalar_t, kVec><<<tile_grid(reduce), tile_block(reduce), 0, stream>>>(
              reduce, xp, partial_mean, partial_m2);
        } else {
          bn_stats_nchw_kernel<scalar_t, kVec><<<tile_grid(reduce), tile_block(reduce), 0, stream>>>(
              reduce, xp, partial_mean, partial_m2);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }

    auto finalize = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      bn_forward_finalize_kernel<acc_t, param_t><<<finalize_grid(reduce), kFinalizeBlock, 0, stream>>>(
          reduce, partial_mean, partial_m2, weight.const_data_ptr<param_t>(), bias.const_data_ptr<param_t>(),
          running_mean.const_data_ptr<param_t>(), running_var.const_data_ptr<param_t>(), training, momentum,
          eps, save_mean.mutable_data_ptr<acc_t>(), save_invstd.mutable_data_ptr<acc_t>(),
          new_running_mean.mutable_data_ptr<param_t>(), new_running_var.mutable_data_ptr<param_t>(), scale,
          shift);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // The BN parameters are x's dtype, or float32 for a float16/bfloat16 x (checked by the caller).
    if (weight.scalar_type() == x.scalar_type()) {
      finalize(scalar_t());
    } else {
      finalize(acc_t());
    }

    if (x.numel() == 0) return;
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_vector_width<scalar_t>(elementwise, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      if (elementwise.channels_last) {
        bn_forward_nhwc_kernel<scalar_t, kVec><<<tile_grid(elementwise), tile_block(elementwise), 0, stream>>>(
            elementwise, xp, rp, scale, shift, op, relu);
      } else {
        bn_forward_nchw_kernel<scalar_t, kVec><<<tile_grid(elementwise), tile_block(elementwise), 0, stream>>>(
            elementwise, xp, rp, scale, shift, op, relu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bn_act_backward_launch(const bn::TilePlan& reduce, const bn::TilePlan& elementwise,
                            const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                            bool training, bool relu, const at::Tensor& grad_x, const at::Tensor& grad_weight,
                            const at::Tensor& grad_bias, const at::Tensor& grad_pre, const at::Tensor& workspace) {
  if (reduce.channels == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* yp = out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* mean = save_mean.const_data_ptr<acc_t>();
    const acc_t* invstd = save_invstd.const_data_ptr<acc_t>();
    acc_t* ws = workspace.mutable_data_ptr<acc_t>();
    const int64_t partials = reduce.channels * reduce.tiles();
    acc_t* partial_g = ws;
    acc_t* partial_gx = ws + partials;
    acc_t* coef = ws + 2 * partials;

    if (reduce.tiles() > 0) {
      with_vector_width<scalar_t>(reduce, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        if (reduce.channels_last) {
          bn_backward_reduce_nhwc_kernel<scalar_t, kVec><<<tile_grid(reduce), tile_block(reduce), 0, stream>>>(
              reduce, gp, yp, xp, mean, relu, partial_g, partial_gx);
        } else {
          bn_backward_reduce_nchw_kernel<scalar_t, kVec><<<tile_grid(reduce), tile_block(reduce), 0, stream>>>(
              reduce, gp, yp, xp, mean, relu, partial_g, partial_gx);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }

    auto finalize = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      bn_backward_finalize_kernel<acc_t, param_t><<<finalize_grid(reduce), kFinalizeBlock, 0, stream>>>(
          reduce, partial_g, partial_gx, weight.const_data_ptr<param_t>(), invstd, training,
          grad_weight.mutable_data_ptr<param_t>(), grad_bias.mutable_data_ptr<param_t>(), coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (weight.scalar_type() == x.scalar_type()) {
      finalize(scalar_t());
    } else {
      finalize(acc_t());
    }

    if (x.numel() == 0) return;
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gpp = grad_pre.mutable_data_ptr<scalar_t>();
    with_vector_width<scalar_t>(elementwise, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      if (elementwise.channels_last) {
        bn_backward_nhwc_kernel<scalar_t, kVec><<<tile_grid(elementwise), tile_block(elementwise), 0, stream>>>(
            elementwise, gp, yp, xp, mean, coef, relu, gxp, gpp);
      } else {
        bn_backward_nchw_kernel<scalar_t, kVec><<<tile_grid(elementwise), tile_block(elementwise), 0, stream>>>(
            elementwise, gp, yp, xp, mean, coef, relu, gxp, gpp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace resnet_fused::cuda
