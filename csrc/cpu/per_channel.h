// Per-channel parameter vectors of the CPU kernels (a BN's weight, bias and statistics, a scale and a shift):
// their shape check and their values in the type a kernel computes in.
#pragma once

#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

namespace resnet_fused::cpu {

// `op: name must have shape [channels], got ...` unless t is a 1-D CPU tensor with `channels` values (the kernels
// read it on the host; the modules call some ops without the Python checks, so these are the last ones).
inline void check_per_channel(const char* op, const at::Tensor& t, int64_t channels, const char* name) {
  TORCH_CHECK(t.is_cpu(), op, ": ", name, " is on ", t.device(), " but x is on cpu");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape [", channels, "], got ",
              t.sizes());
}

// The values of a 1-D CPU tensor of any floating dtype and stride, as T (each converted once), read in place:
// no converted copy of the tensor per call.
template <typename T>
std::vector<T> values_as(const at::Tensor& t) {
  std::vector<T> values(t.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "values_as", [&] {
    const auto acc = t.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < t.size(0); ++i) values[i] = static_cast<T>(acc[i]);
  });
  return values;
}

}  // namespace resnet_fused::cpu
