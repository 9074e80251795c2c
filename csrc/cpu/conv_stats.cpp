// conv_stats on the CPU: the prologue and the convolution as ATen ops, the per-channel statistics of the
// convolution's accumulator in double. It depends on ATen only (no loops.h): correctness first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "../layout.h"
#include "kernels.h"

namespace resnet_fused::cpu {
namespace {

// (count, mean, M2) of one channel over some pixels, combined with Chan's formula: no E[y^2] - E[y]^2
// cancellation when the mean is large against the spread.
struct Moments {
  double count = 0, mean = 0, m2 = 0;

  void combine(const Moments& other) {
    if (other.count == 0) return;
    const double total = count + other.count;
    const double delta = other.mean - mean;
    mean += delta * (other.count / total);
    m2 += other.m2 + delta * delta * (count * other.count / total);
    count = total;
  }
};

// Pixels per partial. Fixed, so the partials and their combining order, hence the result, do not depend
// on the number of threads.
constexpr int64_t kPixelsPerChunk = 256;

// Per-channel moments of pixels [s0, s1) of image n, two passes in double (mean, then squared deviations).
template <typename scalar_t>
void chunk_moments(const scalar_t* data, const ChannelView& v, int64_t n, int64_t s0, int64_t s1,
                   Moments* out) {
  std::vector<double> sum(v.c, 0.0), m2(v.c, 0.0);
  const double count = static_cast<double>(s1 - s0);
  if (v.channels_last()) {  // channels innermost: pixels outer
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t* row = data + v.offset(n, 0, s);
      for (int64_t c = 0; c < v.c; ++c) sum[c] += static_cast<double>(row[c]);
    }
    for (int64_t c = 0; c < v.c; ++c) sum[c] /= count;
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t* row = data + v.offset(n, 0, s);
      for (int64_t c = 0; c < v.c; ++c) {
        const double d = static_cast<double>(row[c]) - sum[c];
        m2[c] += d * d;
      }
    }
  } else {  // pixels innermost: channels outer
    for (int64_t c = 0; c < v.c; ++c) {
      const scalar_t* plane = data + v.offset(n, c, 0);
      double total = 0;
      for (int64_t s = s0; s < s1; ++s) total += static_cast<double>(plane[s]);
      sum[c] = total / count;
      for (int64_t s = s0; s < s1; ++s) {
        const double d = static_cast<double>(plane[s]) - sum[c];
        m2[c] += d * d;
      }
    }
  }
  for (int64_t c = 0; c < v.c; ++c) out[c] = {count, sum[c], m2[c]};
}

// Writes the mean and biased variance per channel of `acc` (contiguous in `format`) to mean/var.
template <typename scalar_t>
void channel_statistics(const at::Tensor& acc, at::MemoryFormat format, at::Tensor& mean, at::Tensor& var) {
  const ChannelView v = ChannelView::of(acc, format);
  const int64_t chunks_per_image = (v.s + kPixelsPerChunk - 1) / kPixelsPerChunk;
  const int64_t chunks = v.n * chunks_per_image;
  std::vector<Moments> partials(chunks * v.c);
  const scalar_t* data = acc.const_data_ptr<scalar_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n = chunk / chunks_per_image;
      const int64_t s0 = (chunk % chunks_per_image) * kPixelsPerChunk;
      chunk_moments(data, v, n, s0, std::min(s0 + kPixelsPerChunk, v.s), partials.data() + chunk * v.c);
    }
  });
  std::vector<double> means(v.c), vars(v.c);
  at::parallel_for(0, v.c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments total;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total.combine(partials[chunk * v.c + c]);
      const double nan = std::numeric_limits<double>::quiet_NaN();
      means[c] = total.count > 0 ? total.mean : nan;
      vars[c] = total.count > 0 ? total.m2 / total.count : nan;
    }
  });
  mean.copy_(at::tensor(means, at::kDouble));
  var.copy_(at::tensor(vars, at::kDouble));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "conv_stats: x and weight must be 4-D, got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "conv_stats (CPU): tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "conv_stats: x and weight dtypes differ (",
              x.scalar_type(), " vs ", weight.scalar_type(), ")");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "conv_stats: scale and shift must be given together");
  TORCH_CHECK(x.size(1) == weight.size(1) * groups, "conv_stats: x has ", x.size(1),
              " channels, weight with groups=", groups, " expects ", weight.size(1) * groups);

  const at::MemoryFormat format = output_memory_format(x);
  const bool is_double = x.scalar_type() == at::kDouble;
  // The prologue runs in float32 (float64 for a float64 x) and its result is rounded to x's dtype, as the
  // GPU kernels do on their input tiles; the convolution pads that result with zeros.
  const at::ScalarType op_dtype = is_double ? at::kDouble : at::kFloat;
  at::Tensor z = x;
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == x.size(1) && shift->dim() == 1 &&
                    shift->size(0) == x.size(1),
                "conv_stats: scale and shift must have shape (", x.size(1), "), got ", scale->sizes(), " and ",
                shift->sizes());
    TORCH_CHECK(scale->device().is_cpu() && shift->device().is_cpu(),
                "conv_stats (CPU): scale and shift must be on the CPU");
    z = at::addcmul(shift->to(op_dtype).view({1, -1, 1, 1}), x.to(op_dtype), scale->to(op_dtype).view({1, -1, 1, 1}));
    if (relu) z.relu_();
    z = z.to(x.scalar_type()).contiguous(format);
  }
  // The accumulator: float32 for 16-bit inputs, x's dtype otherwise; y is it rounded to x's dtype.
  const at::ScalarType acc_dtype = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)
                                       ? at::kFloat
                                       : x.scalar_type();
  const at::Tensor acc = at::convolution(z.to(acc_dtype), weight.to(acc_dtype), std::nullopt, stride, padding,
                                         dilation, false, {0, 0}, groups)
                             .contiguous(format);
  const at::Tensor y = acc.to(x.scalar_type());

  auto stats_options = x.options().dtype(op_dtype);
  at::Tensor mean = at::empty({weight.size(0)}, stats_options);
  at::Tensor var = at::empty({weight.size(0)}, stats_options);
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "conv_stats", [&] {
    channel_statistics<scalar_t>(acc, format, mean, var);
  });
  return {y, mean, var};
}

}  // namespace resnet_fused::cpu
