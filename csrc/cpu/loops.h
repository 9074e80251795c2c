// The two loop shapes every CPU kernel here is made of: an elementwise pass that knows each element's
// channel, and a per-channel reduction. Both walk memory in its storage order for NCHW and NHWC.
#pragma once

#include <algorithm>
#include <array>
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

// Per-channel sums in double of kTerms quantities: term(offset, channel) returns the element's
// std::array<double, kTerms>. Returns the sums term-major: sums[k * C + c]. Work is split into pieces
// fixed by the shape alone (row chunks in NHWC, (n, c) planes in NCHW), each swept in storage order,
// and their partial sums are combined in a fixed order: the result does not depend on the thread count.
template <int kTerms, typename Term>
std::vector<double> reduce_per_channel(const ChannelView& v, const Term& term) {
  const int64_t width = v.c * kTerms;
  std::vector<double> sums(width, 0.0);
  if (v.channels_last()) {
    const int64_t rows = v.n * v.s;
    const int64_t chunks = std::clamp<int64_t>(rows * v.c / kGrainSize, 1, 64);
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    std::vector<double> partial(chunks * width, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* acc = partial.data() + chunk * width;  // term-major, so the channel loop vectorizes
        const int64_t last = std::min(rows, (chunk + 1) * rows_per_chunk);
        for (int64_t row = chunk * rows_per_chunk; row < last; ++row) {
          for (int64_t c = 0; c < v.c; ++c) {
            const auto values = term(row * v.c + c, c);
            for (int k = 0; k < kTerms; ++k) acc[k * v.c + c] += values[k];
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t i = 0; i < width; ++i) sums[i] += partial[chunk * width + i];
  } else {
    const int64_t planes = v.n * v.c;
    std::vector<double> partial(planes * kTerms, 0.0);
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(v.s, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t plane = begin; plane < end; ++plane) {
                         const int64_t c = plane % v.c;
                         std::array<double, kTerms> acc{};
                         for (int64_t s = 0; s < v.s; ++s) {
                           const auto values = term(plane * v.s + s, c);
                           for (int k = 0; k < kTerms; ++k) acc[k] += values[k];
                         }
                         for (int k = 0; k < kTerms; ++k) partial[plane * kTerms + k] = acc[k];
                       }
                     });
    for (int64_t plane = 0; plane < planes; ++plane)
      for (int k = 0; k < kTerms; ++k) sums[k * v.c + plane % v.c] += partial[plane * kTerms + k];
  }
  return sums;
}

}  // namespace resnet_fused::cpu
