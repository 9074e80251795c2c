// scale_add_act and its backward on the CPU: out = act(x * scale[n, c] + residual), the tail of a block with a
// squeeze-and-excitation or ECA gate (one scale per sample and channel), in one vectorized pass instead of
// PyTorch's multiply, add and ReLU (three passes, two of them writing an activation-sized tensor). The backward
// is one pass too: it writes the gradient before the ReLU (the residual's) and x's, and sums scale's over each
// plane, where PyTorch takes a ReLU backward, a multiply and a multiply-and-sum.
#include <algorithm>
#include <array>
#include <memory>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "loops.h"

namespace resnet_fused::cpu {
namespace {

void check_scale(const char* op, const at::Tensor& x, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(1), op,
              ": scale must have shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type(), op, ": x and scale dtypes differ (", x.scalar_type(), " vs ",
              scale.scalar_type(), ")");
}

}  // namespace

at::Tensor scale_add_act(const at::Tensor& x_in, const at::Tensor& scale, const at::Tensor& residual, bool relu) {
  check_scale("scale_add_act", x_in, scale);
  TORCH_CHECK(residual.sizes() == x_in.sizes(), "scale_add_act: residual must have x's shape ", x_in.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x_in.scalar_type(), "scale_add_act: x and residual dtypes differ (",
              x_in.scalar_type(), " vs ", residual.scalar_type(), ")");
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format), r = residual.contiguous(format);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  const ChannelView v = ChannelView::of(x, format);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_add_act_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using opmath_t = typename IO::opmath_t;
    const at::Tensor s_t = scale.to(at::toOpMathType(x.scalar_type())).contiguous();
    const opmath_t* s = s_t.const_data_ptr<opmath_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    with_flag(relu, [&](auto with_relu) {
      constexpr bool kRelu = decltype(with_relu)::value;
      // `count` values from `offset`, scaled by scale_of(j, n), the scales of values j.. (NHWC: the row's channels;
      // NCHW: one channel's).
      auto sweep = [&](int64_t offset, int64_t count, auto scale_of) {
        for (int64_t j = 0; j < count; j += IO::kWidth) {
          const int64_t n = std::min(IO::kWidth, count - j);
          const auto xv = IO::load(xp + offset + j, n), rv = IO::load(rp + offset + j, n), sv = scale_of(j, n);
          typename IO::Pack y;
          for (int p = 0; p < IO::kParts; ++p) y[p] = relu_if<kRelu>(at::vec::fmadd(xv[p], sv[p], rv[p]));
          IO::store(op + offset + j, y, n);
        }
      };
      if (v.channels_last()) {
        at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, kGrainSize / v.c), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const opmath_t* row_scale = s + row / v.s * v.c;
            sweep(row * v.c, v.c, [&](int64_t j, int64_t n) { return IO::load_acc(row_scale + j, n); });
          }
        });
      } else {  // NCHW, or one channel: planes, one scale each
        at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(v.s, 1)),
                         [&](int64_t begin, int64_t end) {
          for (int64_t plane = begin; plane < end; ++plane) {
            const auto sv = IO::broadcast(s[plane]);
            sweep(plane * v.s, v.s, [&](int64_t, int64_t) { return sv; });
          }
        });
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_add_act_backward(const at::Tensor& grad_out_in,
                                                                      const at::Tensor& out_in,
                                                                      const at::Tensor& x_in, const at::Tensor& scale,
                                                                      bool relu) {
  check_scale("scale_add_act_backward", x_in, scale);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && out_in.sizes() == x_in.sizes(),
              "scale_add_act_backward: grad_out and out must have x's shape ", x_in.sizes());
  const auto format = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(format), grad_out = grad_out_in.contiguous(format);
  const at::Tensor out = relu ? out_in.contiguous(format) : at::Tensor();  // only for the ReLU mask
  const ChannelView v = ChannelView::of(x, format);
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Preserve);
  // Without ReLU the gradient before it is grad_out itself: nothing to write (the caller uses grad_out).
  at::Tensor grad_pre = relu ? at::empty_like(x, at::MemoryFormat::Preserve) : at::empty({0}, x.options());
  // Per (sample, channel), summed in double over chunks summed in the accumulation type.
  std::unique_ptr<double[]> sums(new double[v.n * v.c]);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_add_act_backward_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using Acc = typename IO::Acc;
    using opmath_t = typename IO::opmath_t;
    const at::Tensor s_t = scale.to(at::toOpMathType(x.scalar_type())).contiguous();
    const opmath_t* s = s_t.const_data_ptr<opmath_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* outp = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gpre = relu ? grad_pre.data_ptr<scalar_t>() : nullptr;
    // The sums of g * x per (sample, channel), g the gradient before the ReLU, over fn's inputs `in` (grad_out, x
    // [, out]); fn also gives the `outputs` ([grad_pre,] grad_x). The sweeps and chunked sums of loops.h, one
    // sample's view at a time with its scales as the per-channel parameters.
    auto reduce = [&](auto in, auto outputs, const auto& fn) {
      constexpr int kIn = std::tuple_size<decltype(in)>::value, kOut = std::tuple_size<decltype(outputs)>::value;
      if (v.channels_last()) {
        // Units of (sample, piece of rows) as sum_per_channel splits one sample, each unit's partial sums added up
        // per sample in a fixed order: results do not depend on the thread count.
        const ChannelView sample{1, v.c, v.s, v.s * v.c, 1, v.c};
        const ReductionPlan plan = ReductionPlan::of(sample);
        const int64_t width = padded<scalar_t>(v.c), chunk = chunk_rows(v.c);
        std::unique_ptr<double[]> partial(new double[v.n * plan.pieces * v.c]);
        at::parallel_for(0, v.n * plan.pieces, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> acc(width);
          for (int64_t unit = begin; unit < end; ++unit) {
            const int64_t n = unit / plan.pieces, first = unit % plan.pieces * plan.piece_size;
            const int64_t last = std::min(v.s, first + plan.piece_size), offset = n * v.s * v.c;
            auto sample_in = in;
            auto sample_out = outputs;
            for (auto& p : sample_in) p += offset;
            for (auto& p : sample_out) p += offset;
            double* unit_sums = partial.get() + unit * v.c;
            std::fill_n(unit_sums, v.c, 0.0);
            for (int64_t row = first; row < last; row += chunk) {
              sweep_rows<scalar_t, kIn, 1, 1, kOut>(sample, row, std::min(last, row + chunk), sample_in,
                                                    {s + n * v.c}, sample_out, fn, acc.data());
              for (int64_t c = 0; c < v.c; ++c) unit_sums[c] += acc[c];
            }
          }
        });
        for (int64_t n = 0; n < v.n; ++n) {
          double* total = sums.get() + n * v.c;
          std::fill_n(total, v.c, 0.0);
          for (int64_t p = 0; p < plan.pieces; ++p) {
            const double* from = partial.get() + (n * plan.pieces + p) * v.c;
            for (int64_t c = 0; c < v.c; ++c) total[c] += from[c];
          }
        }
      } else {  // NCHW, or one channel: a plane per (sample, channel), the scale s[plane]
        constexpr int64_t kChunk = 4096;
        at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(v.s, 1)),
                         [&](int64_t begin, int64_t end) {
          for (int64_t plane = begin; plane < end; ++plane) {
            double total = 0;
            for (int64_t j = 0; j < v.s; j += kChunk) {
              total += sum_segment<scalar_t, kIn, 1, 1, kOut>(plane * v.s + j, std::min(kChunk, v.s - j), plane,
                                                               in, {s}, outputs, fn)[0];
            }
            sums[plane] = total;
          }
        });
      }
    };
    if (relu) {
      reduce(std::array<const scalar_t*, 3>{gp, xp, outp}, std::array<scalar_t*, 2>{gpre, gxp},
             [](const auto& in, const auto& p) {
               const Acc g = Acc::blendv(Acc(0), in[0], in[2] > Acc(0));
               return std::array<Acc, 3>{g * in[1], g, g * p[0]};
             });
    } else {
      reduce(std::array<const scalar_t*, 2>{gp, xp}, std::array<scalar_t*, 1>{gxp},
             [](const auto& in, const auto& p) { return std::array<Acc, 2>{in[0] * in[1], in[0] * p[0]}; });
    }
  });
  at::Tensor grad_scale = at::empty({v.n, v.c}, scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_scale.scalar_type(), "scale_add_act_grad_scale", [&] {
    scalar_t* p = grad_scale.data_ptr<scalar_t>();
    for (int64_t i = 0; i < v.n * v.c; ++i) p[i] = static_cast<scalar_t>(sums[i]);
  });
  return {grad_x, grad_scale, grad_pre};
}

}  // namespace resnet_fused::cpu
