// The two loop shapes every CPU kernel here is made of: an elementwise pass that knows each element's
// channel, and a per-channel reduction. Both walk memory in its storage order for NCHW and NHWC.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "../layout.h"

namespace resnet_fused::cpu {

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kGrainSize = 32768;

// Calls body(offset, channel) once for every element of the view, in parallel.
template <typename Body>
void for_each_element(const ChannelView& v, const Body& body) {
  if (v.channels_last()) {
    // NHWC: rows of C contiguous channels.
    const int64_t rows = v.n * v.s;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainSize / v.c), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * v.c;
        for (int64_t c = 0; c < v.c; ++c) body(base + c, c);
      }
    });
  } else {
    // NCHW: planes of S contiguous pixels of one channel.
    const int64_t planes = v.n * v.c;
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(v.s, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t plane = begin; plane < end; ++plane) {
                         const int64_t c = plane % v.c, base = plane * v.s;
                         for (int64_t s = 0; s < v.s; ++s) body(base + s, c);
                       }
                     });
  }
}

// Per-channel sums in double of kTerms quantities: body(offset, channel, acc) adds into acc[0..kTerms).
// Returns C * kTerms sums, channel-major. Channels are split into blocks that are reduced
// independently, so the result does not depend on the thread count.
template <int kTerms, typename Body>
std::vector<double> reduce_per_channel(const ChannelView& v, const Body& body) {
  constexpr int64_t kBlock = 16;  // channels per task: one 64-byte line of fp32 in NHWC
  std::vector<double> sums(v.c * kTerms, 0.0);
  const int64_t blocks = (v.c + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kBlock, c1 = std::min(v.c, c0 + kBlock);
      double* acc = sums.data() + c0 * kTerms;
      for (int64_t n = 0; n < v.n; ++n) {
        if (v.channels_last()) {
          for (int64_t s = 0; s < v.s; ++s)
            for (int64_t c = c0; c < c1; ++c) body(v.offset(n, c, s), c, acc + (c - c0) * kTerms);
        } else {
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t s = 0; s < v.s; ++s) body(v.offset(n, c, s), c, acc + (c - c0) * kTerms);
        }
      }
    }
  });
  return sums;
}

}  // namespace resnet_fused::cpu
