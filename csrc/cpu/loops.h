// The loop shapes every CPU kernel here is made of, vectorized with at::vec: an elementwise map with
// per-channel parameters, per-channel sums, and per-channel moments (mean and M2). All walk memory in storage
// order for NCHW (planes of H*W values of one channel) and NHWC (rows of C channels); 16-bit values are
// widened to float in registers and all math runs in the accumulation type (float, double for double).
//
// This header is compiled once per instruction set (setup.py: one library per ISA), so at::vec's
// Vectorized is 512, 256 or 128 bits wide depending on the library that includes it.
#pragma once

#include <algorithm>
#include <array>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../layout.h"

namespace resnet_fused::cpu {

using at::vec::Vectorized;

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kGrainSize = 32768;

// Bytes read by a pass from which on a reduction without outputs sweeps its rows in storage order (sweep_rows).
constexpr int64_t kStreamedBytes = int64_t(12) << 20;

// fn(std::true_type{}) or fn(std::false_type{}): a runtime flag (ReLU or not) as a compile-time constant, so that
// the elementwise lambdas built on it test nothing per vector. A flag captured by reference was reloaded and tested
// for every vector (perf annotate: the hottest instructions of bn_act's apply pass over 8x2048x4x4).
template <typename Fn>
void with_flag(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// max(v, 0) that lets NaN through, as torch.relu does; v itself where kRelu is false.
template <bool kRelu, typename Acc>
Acc relu_if(const Acc& v) {
  if constexpr (kRelu) {
    return at::vec::maximum(v, Acc(0));
  } else {
    return v;
  }
}

// Loads and stores of scalar_t in units of one Vectorized<scalar_t>, computed as accumulation-type vectors:
// one Vectorized<float>/<double> for float/double, two Vectorized<float> for bfloat16/half.
template <typename scalar_t>
struct VecIO {
  using opmath_t = at::opmath_type<scalar_t>;
  using Acc = Vectorized<opmath_t>;
  static constexpr int64_t kWidth = Vectorized<scalar_t>::size();  // elements per load
  static constexpr int kParts = kWidth / Acc::size();
  using Pack = std::array<Acc, kParts>;

  // `count` < kWidth loads a tail: the missing lanes are zero.
  static Pack load(const scalar_t* p, int64_t count = kWidth) {
    if constexpr (kParts == 1) {
      return {count == kWidth ? Acc::loadu(p) : Acc::loadu(p, count)};
    } else {
      const auto v = count == kWidth ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, count);
      const auto [a, b] = at::vec::convert_to_float<scalar_t>(v);
      return {a, b};
    }
  }
  static void store(scalar_t* p, const Pack& v, int64_t count = kWidth) {
    if constexpr (kParts == 1) {
      v[0].store(p, count);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, count);
    }
  }
  // Accumulation-type values (per-channel parameters, accumulators) for the same kWidth lanes.
  static Pack load_acc(const opmath_t* p, int64_t count = kWidth) {
    Pack v;
    for (int k = 0; k < kParts; ++k) {
      const int64_t n = std::clamp<int64_t>(count - k * Acc::size(), 0, Acc::size());
      v[k] = n == Acc::size() ? Acc::loadu(p + k * Acc::size()) : Acc::loadu(p + k * Acc::size(), n);
    }
    return v;
  }
  static void store_acc(opmath_t* p, const Pack& v) {  // p has room for kWidth values
    for (int k = 0; k < kParts; ++k) v[k].store(p + k * Acc::size());
  }
  static Pack broadcast(opmath_t value) {
    Pack v;
    v.fill(Acc(value));
    return v;
  }
};

// Room for n channels, rounded up to whole vectors, so accumulators are always loaded and stored whole.
template <typename scalar_t>
int64_t padded(int64_t n) {
  constexpr int64_t w = VecIO<scalar_t>::kWidth;
  return (n + w - 1) / w * w;
}

// Calls segment(offset, count, channel) over the view in parallel: `count` contiguous elements from `offset`,
// of one `channel` (NCHW), or channel < 0: the channels 0..count-1 of one NHWC row. Plane pieces are at most
// kGrainSize long, so a single large plane (a flat tensor) still spreads over the threads.
template <typename Segment>
void for_each_segment(const ChannelView& v, const Segment& segment) {
  if (v.channels_last()) {
    at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, kGrainSize / v.c), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) segment(row * v.c, v.c, int64_t(-1));
    });
    return;
  }
  const int64_t pieces = std::max<int64_t>(1, (v.s + kGrainSize - 1) / kGrainSize);
  const int64_t piece = (v.s + pieces - 1) / pieces;
  at::parallel_for(0, v.n * v.c * pieces, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(piece, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t unit = begin; unit < end; ++unit) {
                       const int64_t plane = unit / pieces, start = unit % pieces * piece;
                       const int64_t count = std::min(piece, v.s - start);
                       if (count > 0) segment(plane * v.s + start, count, plane % v.c);
                     }
                   });
}

// fn over the elements of one load (fn as described at sweep_segment, below), an accumulation-type vector at a
// time: its first kTerms results added to acc, the other kOut returned. Always inlined: as a plain template,
// bn_act_backward over 8x64x28x28 NHWC took 208 us against 110 with the body written out in each sweep.
template <typename IO, int kTerms, int kOut, size_t kIn, size_t kParams, typename Fn>
C10_ALWAYS_INLINE std::array<typename IO::Pack, kOut> apply_vector(const Fn& fn,
                                                                   const std::array<typename IO::Pack, kIn>& x,
                                                                   const std::array<typename IO::Pack, kParams>& p,
                                                                   std::array<typename IO::Pack, kTerms>& acc) {
  std::array<typename IO::Pack, kOut> y;
  for (int part = 0; part < IO::kParts; ++part) {
    std::array<typename IO::Acc, kIn> xs;
    std::array<typename IO::Acc, kParams> ps;
    for (size_t i = 0; i < kIn; ++i) xs[i] = x[i][part];
    for (size_t k = 0; k < kParams; ++k) ps[k] = p[k][part];
    const auto ys = fn(xs, ps);
    for (int t = 0; t < kTerms; ++t) acc[t][part] = acc[t][part] + ys[t];
    for (int o = 0; o < kOut; ++o) y[o][part] = ys[kTerms + o];
  }
  return y;
}

// Evaluates fn over `count` contiguous elements from `offset` (of one `channel`, or, channel < 0, the channels
// 0..count-1 of one NHWC row), a vector of VecIO::kWidth elements at a time, and hands each vector's results to
// visit(j, n, results): the vector starts at element offset + j and has n valid lanes (a tail: n < kWidth).
// fn(const std::array<Acc, kIn>&, const std::array<Acc, kParams>&) -> std::array<Acc, kResults>, where in[i] are
// the inputs' values and params[k] the per-channel parameters of those elements.
// The pointer arrays are taken by value, here and in the sweeps below: at::vec's vector types may alias anything,
// so with arrays held by reference every store made the compiler reload each pointer (perf annotate of
// bn_act_backward's apply pass: the pointer loads and stack spills were its hottest instructions).
// The whole vectors and the tail are separate loops, n a compile-time kWidth in the first: with one loop testing
// n < kWidth on every vector (for the partial loads and stores), the loop's compares, jumps and address
// arithmetic were its hottest instructions in perf annotate (bn_act_backward's apply over 8x512x28x28 NHWC), ahead
// of its loads.
template <typename scalar_t, int kIn, int kParams, int kResults, typename Fn, typename Visit>
void sweep_segment(int64_t offset, int64_t count, int64_t channel, std::array<const scalar_t*, kIn> in,
                   std::array<const at::opmath_type<scalar_t>*, kParams> params, const Fn& fn,
                   const Visit& visit) {
  using IO = VecIO<scalar_t>;
  auto sweep = [&](auto per_element_params) {
    constexpr bool kLoadParams = decltype(per_element_params)::value;
    std::array<typename IO::Pack, kParams> p;
    if constexpr (!kLoadParams) {
      for (int k = 0; k < kParams; ++k) p[k] = IO::broadcast(params[k][channel]);
    }
    auto vector_at = [&](int64_t j, auto lanes) {
      if constexpr (kLoadParams) {
        for (int k = 0; k < kParams; ++k) p[k] = IO::load_acc(params[k] + j, lanes);
      }
      std::array<typename IO::Pack, kIn> x;
      for (int i = 0; i < kIn; ++i) x[i] = IO::load(in[i] + offset + j, lanes);
      std::array<typename IO::Pack, 0> no_sums;
      visit(j, lanes, apply_vector<IO, 0, kResults>(fn, x, p, no_sums));
    };
    const int64_t whole = count - count % IO::kWidth;
    for (int64_t j = 0; j < whole; j += IO::kWidth) vector_at(j, std::integral_constant<int64_t, IO::kWidth>{});
    if (whole < count) vector_at(whole, count - whole);
  };
  with_flag(channel < 0, sweep);
}

// Rows of an NHWC chunk: its values stay in L2 between the passes over it (at most 256 KB of float), the
// per-chunk work over the channels (finishing its sums, merging them) is spread over at least 32 rows where
// that fits, and sums over at most 256 values per lane stay accurate before they are merged in double.
inline int64_t chunk_rows(int64_t channels) {
  return std::clamp<int64_t>(65536 / std::max<int64_t>(channels, 1), 4, 256);
}

// Channels in one block of sweep_rows: the loads whose sums and parameters fit in about half the vector registers
// (32 with AVX-512, 16 below), kWidth channels each.
template <typename scalar_t, int kParams, int kTerms>
constexpr int64_t sweep_rows_block() {
  using IO = VecIO<scalar_t>;
  constexpr int kHeld = IO::Acc::size() * sizeof(typename IO::opmath_t) >= 64 ? 16 : 8;
  return std::max(1, kHeld / (std::max(1, kTerms + kParams) * IO::kParts)) * IO::kWidth;
}

// NHWC rows [first, last): fn over every element (fn as for sweep_segment), its first kTerms results summed per
// channel into sums[t * padded(C) + c] (none: sums may be null), its other kOut results stored to out[o] (an
// output may be one of the inputs). One block of channels at a time down the rows, the block's sums and
// parameters in registers: a sum kept in memory is loaded and stored once per row, and a narrow row (64
// channels: 4 vectors) leaves too few independent sums to hide that store-to-load latency; parameters loaded
// per row cost as many loads as the data. Lanes past C (a tail load's zeros) hold sums nobody reads.
template <typename scalar_t, int kIn, int kParams, int kTerms, int kOut, typename Fn>
void sweep_rows(const ChannelView& v, int64_t first, int64_t last, std::array<const scalar_t*, kIn> in,
                std::array<const at::opmath_type<scalar_t>*, kParams> params,
                std::array<scalar_t*, kOut> out, const Fn& fn, at::opmath_type<scalar_t>* sums) {
  using IO = VecIO<scalar_t>;
  using Pack = typename IO::Pack;
  constexpr int64_t kBlock = sweep_rows_block<scalar_t, kParams, kTerms>();
  constexpr int kLoads = kBlock / IO::kWidth;
  const int64_t width = padded<scalar_t>(v.c);
  if constexpr (kTerms > 0) {
    // A reduction over rows wider than one block whose sums fit in 4 KB of L1, when it also writes or reads at least
    // kStreamedBytes in all: the rows in storage order, the sums in memory. A block at a time, bn_act_backward's
    // pass 1 (three tensors read, one written, each a block every 1 KB) took 1.2x to 1.7x as long over
    // 8x256x28x28. Without the written tensor (the statistics, the backward without ReLU) the blocks were as fast
    // or faster on tensors a few MB large, and slower on larger ones, read from memory a block every row (float32,
    // two threads, medians of 100 interleaved calls, two runs: the backward's sums over 8x256x56x56 2844 and 2564 us
    // by blocks, 1567 and 1865 in storage order; 8x256x28x28 406 / 344 against 271 / 234; the statistics over
    // 8x256x56x56 1488 / 1342 against 1235 / 1166; but over 8x256x28x28, 6.4 MB, 184 / 172 against 283 / 223).
    // Rows of 1024 or more float channels (8 KB of sums and more) keep the blocks.
    if (v.c > kBlock && kTerms * width * static_cast<int64_t>(sizeof(at::opmath_type<scalar_t>)) <= 4096 &&
        (kOut > 0 || kIn * v.n * v.s * v.c * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamedBytes)) {
      std::fill(sums, sums + kTerms * width, at::opmath_type<scalar_t>(0));
      for (int64_t row = first; row < last; ++row) {
        for (int64_t c = 0; c < v.c; c += IO::kWidth) {
          const int64_t at = row * v.c + c, n = std::min(IO::kWidth, v.c - c);
          std::array<Pack, kIn> x;
          for (int i = 0; i < kIn; ++i) x[i] = IO::load(in[i] + at, n);
          std::array<Pack, kParams> p;
          for (int k = 0; k < kParams; ++k) p[k] = IO::load_acc(params[k] + c, n);
          std::array<Pack, kTerms> acc;
          for (int t = 0; t < kTerms; ++t) acc[t] = IO::load_acc(sums + t * width + c);
          const auto y = apply_vector<IO, kTerms, kOut>(fn, x, p, acc);
          for (int t = 0; t < kTerms; ++t) IO::store_acc(sums + t * width + c, acc[t]);
          for (int o = 0; o < kOut; ++o) IO::store(out[o] + at, y[o], n);
        }
      }
      return;
    }
  }
  auto block = [&](int64_t c0, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const int loads = kFull ? kLoads : static_cast<int>((v.c - c0 + IO::kWidth - 1) / IO::kWidth);
    auto lanes = [&](int b) { return kFull ? IO::kWidth : std::min(IO::kWidth, v.c - c0 - b * IO::kWidth); };
    std::array<std::array<Pack, kLoads>, kTerms> acc;
    std::array<std::array<Pack, kLoads>, kParams> p;
    for (int b = 0; b < loads; ++b) {
      for (int t = 0; t < kTerms; ++t) acc[t][b] = IO::broadcast(0);
      for (int k = 0; k < kParams; ++k) p[k][b] = IO::load_acc(params[k] + c0 + b * IO::kWidth, lanes(b));
    }
    for (int64_t row = first; row < last; ++row) {
      for (int b = 0; b < kLoads && b < loads; ++b) {
        const int64_t at = row * v.c + c0 + b * IO::kWidth, n = lanes(b);
        std::array<Pack, kIn> x;
        for (int i = 0; i < kIn; ++i) x[i] = IO::load(in[i] + at, n);
        std::array<Pack, kParams> pb;
        std::array<Pack, kTerms> ab;
        for (int k = 0; k < kParams; ++k) pb[k] = p[k][b];
        for (int t = 0; t < kTerms; ++t) ab[t] = acc[t][b];
        const auto y = apply_vector<IO, kTerms, kOut>(fn, x, pb, ab);
        for (int t = 0; t < kTerms; ++t) acc[t][b] = ab[t];
        for (int o = 0; o < kOut; ++o) IO::store(out[o] + at, y[o], n);
      }
    }
    for (int b = 0; b < loads; ++b)
      for (int t = 0; t < kTerms; ++t) IO::store_acc(sums + t * width + c0 + b * IO::kWidth, acc[t][b]);
  };
  for (int64_t c0 = 0; c0 < v.c; c0 += kBlock) {
    if (c0 + kBlock <= v.c) {
      block(c0, std::true_type{});
    } else {
      block(c0, std::false_type{});
    }
  }
}

// NCHW: the sums in double over `count` values of one `channel` from `offset` of fn's first kTerms results (fn
// as for sweep_segment), accumulated in registers; fn's other kOut results are stored to out[o].
template <typename scalar_t, int kIn, int kParams, int kTerms, int kOut, typename Fn>
std::array<double, kTerms> sum_segment(int64_t offset, int64_t count, int64_t channel,
                                       std::array<const scalar_t*, kIn> in,
                                       std::array<const at::opmath_type<scalar_t>*, kParams> params,
                                       std::array<scalar_t*, kOut> out, const Fn& fn) {
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  std::array<typename IO::Pack, kTerms> acc;
  acc.fill(IO::broadcast(0));
  sweep_segment<scalar_t, kIn, kParams, kTerms + kOut>(
      offset, count, channel, in, params, fn, [&](int64_t j, int64_t n, const auto& y) {
        for (int t = 0; t < kTerms; ++t) {
          for (int part = 0; part < IO::kParts; ++part) {
            // Lanes past the data (a tail load's zeros) would add fn(0, ...): keep them out.
            const int64_t valid = std::clamp<int64_t>(n - part * Acc::size(), 0, Acc::size());
            acc[t][part] = acc[t][part] + (valid == Acc::size() ? y[t][part] : Acc::set(Acc(0), y[t][part], valid));
          }
        }
        for (int o = 0; o < kOut; ++o) IO::store(out[o] + offset + j, y[kTerms + o], n);
      });
  std::array<double, kTerms> sums;
  for (int t = 0; t < kTerms; ++t) {
    std::array<at::opmath_type<scalar_t>, IO::kWidth> lanes;
    IO::store_acc(lanes.data(), acc[t]);
    sums[t] = 0;
    for (const auto l : lanes) sums[t] += l;
  }
  return sums;
}

// Elementwise: out[o][i] = fn(in[0][i], ..., params[0][c], ...)[o] for every element i of channel c (fn as for
// sweep_segment). An output may be one of the inputs (each element is read before it is written).
template <typename scalar_t, int kIn, int kOut, int kParams, typename Fn>
void map_per_channel(const ChannelView& v, const std::array<const scalar_t*, kIn>& in,
                     const std::array<scalar_t*, kOut>& out,
                     const std::array<const at::opmath_type<scalar_t>*, kParams>& params, const Fn& fn) {
  using IO = VecIO<scalar_t>;
  if (v.channels_last() && v.c <= sweep_rows_block<scalar_t, kParams, 0>()) {
    // Rows no wider than one block of sweep_rows: the parameters stay in registers and the rows are still read in
    // storage order (across wider rows, a block at a time would stride through memory, a page per row at 1024
    // float channels).
    at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, kGrainSize / v.c), [&](int64_t begin, int64_t end) {
      sweep_rows<scalar_t, kIn, kParams, 0, kOut>(v, begin, end, in, params, out, fn, nullptr);
    });
    return;
  }
  for_each_segment(v, [&](int64_t offset, int64_t count, int64_t channel) {
    sweep_segment<scalar_t, kIn, kParams, kOut>(offset, count, channel, in, params, fn,
                                                [out, offset](int64_t j, int64_t n, const auto& y) {
                                                  for (int o = 0; o < kOut; ++o) IO::store(out[o] + offset + j, y[o], n);
                                                });
  });
}

// How a per-channel reduction splits its work: into pieces fixed by the shape alone (runs of whole NHWC rows,
// or pieces of NCHW planes), each swept in storage order by one thread, their partial results combined in
// a fixed order. So results do not depend on the thread count.
struct ReductionPlan {
  // NHWC pieces of at least kPieceRows rows, where the tensor still makes kMinPieces of them: each piece leaves a
  // row of partial results (two doubles a channel: the sums, or the mean and M2) that is cleared, written and
  // merged, and the per-chunk work over the channels. Over 16-row pieces of 2048 channels (ResNet-50's layer4 at
  // batch 8) those partials came to a third of the data's bytes (perf of the forward on 8x2048x7x7: 4% of it in the
  // memset clearing them).
  static constexpr int64_t kPieceRows = 64;
  static constexpr int64_t kMinPieces = 4;

  int64_t pieces;      // NHWC: row ranges; NCHW: pieces per plane
  int64_t piece_size;  // NHWC: rows per piece; NCHW: elements per plane piece

  static ReductionPlan of(const ChannelView& v) {
    if (v.channels_last()) {
      const int64_t rows = v.n * v.s;
      const int64_t by_size = std::clamp<int64_t>(rows * v.c / kGrainSize, 1, 64);
      const int64_t pieces = std::min(by_size, std::max(rows / kPieceRows, kMinPieces));
      return {pieces, (rows + pieces - 1) / pieces};
    }
    const int64_t pieces = std::max<int64_t>(1, (v.s + kGrainSize - 1) / kGrainSize);
    return {pieces, (v.s + pieces - 1) / pieces};
  }
  int64_t units(const ChannelView& v) const { return v.channels_last() ? pieces : v.n * v.c * pieces; }
  // Units per parallel task: about kGrainSize elements, so a small tensor is reduced inline, without waking
  // the thread pool (NHWC pieces already hold that many, except the single piece of a small tensor).
  int64_t grain(const ChannelView& v) const {
    return v.channels_last() ? 1 : std::max<int64_t>(1, kGrainSize / std::max<int64_t>(piece_size, 1));
  }
  // Channels whose partial results a unit holds: all of them (NHWC rows), or its plane's one (NCHW).
  static int64_t slots(const ChannelView& v) { return v.channels_last() ? v.c : 1; }
  // The channel of an NCHW unit.
  int64_t channel(const ChannelView& v, int64_t unit) const { return unit / pieces % v.c; }
};

// Channels per task of a merge that reads `per_channel` partial results of each channel: about kGrainSize values
// per task. With a few channels the merge stays on one thread; with wide rows (ResNet-50's 2048 channels over 24
// pieces) it spreads, instead of one thread merging while the other spins.
inline int64_t merge_grain(int64_t per_channel) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(per_channel, 1));
}

// Per-channel sums in double of kTerms quantities, fn(in[0][i], ..., params...) -> std::array<Acc, kTerms + kOut>:
// its first kTerms values are summed, accumulated in the accumulation type over chunks of a few thousand
// elements, then in double, so they stay accurate for any count; the other kOut values are stored to out[o][i]
// in the same pass. Returns the sums term-major: sums[k * C + c].
template <typename scalar_t, int kIn, int kTerms, int kOut, int kParams, typename Fn>
std::vector<double> sum_per_channel(const ChannelView& v, const std::array<const scalar_t*, kIn>& in,
                                    const std::array<scalar_t*, kOut>& out,
                                    const std::array<const at::opmath_type<scalar_t>*, kParams>& params,
                                    const Fn& fn) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ReductionPlan plan = ReductionPlan::of(v);
  const int64_t slots = ReductionPlan::slots(v);
  // [unit][term][slot], zeroed by each unit as it starts: units x C values are not cleared by one thread.
  std::unique_ptr<double[]> partial(new double[plan.units(v) * kTerms * slots]);

  at::parallel_for(0, plan.units(v), plan.grain(v), [&](int64_t begin, int64_t end) {
    if (v.channels_last()) {
      const int64_t width = padded<scalar_t>(v.c);
      std::vector<opmath_t> acc(kTerms * width);
      for (int64_t unit = begin; unit < end; ++unit) {
        double* unit_sums = partial.get() + unit * kTerms * slots;
        std::fill_n(unit_sums, kTerms * slots, 0.0);
        const int64_t last = std::min(v.n * v.s, (unit + 1) * plan.piece_size);
        for (int64_t row = unit * plan.piece_size; row < last; row += chunk_rows(v.c)) {
          sweep_rows<scalar_t, kIn, kParams, kTerms, kOut>(v, row, std::min(last, row + chunk_rows(v.c)), in, params,
                                                          out, fn, acc.data());
          for (int t = 0; t < kTerms; ++t)
            for (int64_t c = 0; c < v.c; ++c) unit_sums[t * v.c + c] += acc[t * width + c];
        }
      }
    } else {
      constexpr int64_t kChunk = 4096;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t plane = unit / plan.pieces, channel = plane % v.c;
        const int64_t start = unit % plan.pieces * plan.piece_size, stop = std::min(v.s, start + plan.piece_size);
        double* unit_sums = partial.get() + unit * kTerms;
        std::fill_n(unit_sums, kTerms, 0.0);
        for (int64_t s = start; s < stop; s += kChunk) {
          const auto chunk = sum_segment<scalar_t, kIn, kParams, kTerms, kOut>(
              plane * v.s + s, std::min(kChunk, stop - s), channel, in, params, out, fn);
          for (int t = 0; t < kTerms; ++t) unit_sums[t] += chunk[t];
        }
      }
    }
  });
  std::vector<double> sums(kTerms * v.c, 0.0);
  if (v.channels_last()) {
    // Ranges of channels in parallel, each adding the units up in their order (the result does not depend on the
    // split).
    at::parallel_for(0, v.c, merge_grain(plan.units(v) * kTerms), [&](int64_t c0, int64_t c1) {
      for (int64_t unit = 0; unit < plan.units(v); ++unit) {
        const double* from = partial.get() + unit * kTerms * slots;
        for (int t = 0; t < kTerms; ++t)
          for (int64_t c = c0; c < c1; ++c) sums[t * v.c + c] += from[t * v.c + c];
      }
    });
    return sums;
  }
  for (int64_t unit = 0; unit < plan.units(v); ++unit) {
    for (int t = 0; t < kTerms; ++t) sums[t * v.c + plan.channel(v, unit)] += partial[unit * kTerms + t];
  }
  return sums;
}

// Per-channel (mean, M2 = sum of squared deviations), in double, over N*H*W values, reading x once from
// memory: each chunk of a few thousand values is summed (relative to a per-channel shift, the piece's
// first value, so a large mean does not swamp the spread), then its squared deviations from the chunk mean
// are summed while it is still in cache, and the chunk is merged into the piece's (count, mean, M2) with
// Chan's formula; the pieces are merged the same way, in a fixed order.
struct Moments {
  std::vector<double> mean, m2;
};

namespace detail {
// Merges a chunk of `nb` values with mean `mb` and M2 `m2b` into (n, mean, m2): Chan et al.'s parallel formula.
inline void chan_merge(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (n == 0) {  // exactly the chunk's values: mb * nb / nb may round
    n = nb, mean = mb, m2 = m2b;
    return;
  }
  const double total = n + nb, delta = mb - mean;
  mean += delta * nb / total;
  m2 += m2b + delta * delta * n * nb / total;
  n = total;
}
}  // namespace detail

template <typename scalar_t>
Moments moments_per_channel(const ChannelView& v, const scalar_t* x) {
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  using opmath_t = typename IO::opmath_t;
  const ReductionPlan plan = ReductionPlan::of(v);
  const int64_t units = plan.units(v);
  // Per unit and slot: (mean, M2); NCHW units hold one channel each. Per unit: the count (every channel of an NHWC
  // row range has the same).
  const int64_t slots = ReductionPlan::slots(v);
  // Set by each unit as it starts: units x C values are not cleared by one thread.
  std::unique_ptr<double[]> count(new double[units]), mean(new double[units * slots]), m2(new double[units * slots]);

  // The terms summed: x - shift (the chunk's sum), then (x - centre)^2 about its mean (the chunk's M2).
  auto deviations = [](const auto& in, const auto& p) { return std::array<Acc, 1>{in[0] - p[0]}; };
  auto squares = [](const auto& in, const auto& p) {
    const Acc d = in[0] - p[0];
    return std::array<Acc, 1>{d * d};
  };

  at::parallel_for(0, units, plan.grain(v), [&](int64_t begin, int64_t end) {
    if (v.channels_last()) {
      const int64_t width = padded<scalar_t>(v.c);
      std::vector<opmath_t> acc(width), shift(width), centre(width);
      std::vector<double> chunk_mean(v.c);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t first = unit * plan.piece_size, last = std::min(v.n * v.s, first + plan.piece_size);
        double n_u = 0;  // every channel of a row range has the same count
        double* mean_u = mean.get() + unit * slots;
        double* m2_u = m2.get() + unit * slots;
        std::fill_n(mean_u, slots, 0.0);
        std::fill_n(m2_u, slots, 0.0);
        if (first < last) {
          for (int64_t c = 0; c < v.c; ++c) shift[c] = static_cast<opmath_t>(x[first * v.c + c]);
        }
        for (int64_t row = first; row < last; row += chunk_rows(v.c)) {
          const int64_t rows = std::min(last, row + chunk_rows(v.c)) - row;
          sweep_rows<scalar_t, 1, 1, 1, 0>(v, row, row + rows, {x}, {shift.data()}, {}, deviations, acc.data());
          for (int64_t c = 0; c < v.c; ++c) {
            chunk_mean[c] = static_cast<double>(shift[c]) + static_cast<double>(acc[c]) / rows;
            centre[c] = static_cast<opmath_t>(chunk_mean[c]);
          }
          sweep_rows<scalar_t, 1, 1, 1, 0>(v, row, row + rows, {x}, {centre.data()}, {}, squares, acc.data());
          // Chan's merge with the count weights hoisted out of the channel loop (all channels share the counts).
          const double total = n_u + rows, weight = rows / total, cross = n_u * rows / total;
          for (int64_t c = 0; c < v.c; ++c) {
            // M2 about the rounded centre, corrected to the exact chunk mean: sum (x - m)^2 = sum (x - c)^2 - n (m - c)^2
            const double offset = chunk_mean[c] - static_cast<double>(centre[c]);
            const double delta = chunk_mean[c] - mean_u[c];
            mean_u[c] += delta * weight;
            m2_u[c] += static_cast<double>(acc[c]) - rows * offset * offset + delta * delta * cross;
          }
          n_u = total;
        }
        count[unit] = n_u;
      }
    } else {
      constexpr int64_t kChunk = 4096;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t plane = unit / plan.pieces;
        const int64_t start = unit % plan.pieces * plan.piece_size, stop = std::min(v.s, start + plan.piece_size);
        count[unit] = mean[unit] = m2[unit] = 0;
        if (start >= stop) continue;
        const int64_t base = plane * v.s;
        const opmath_t shift = static_cast<opmath_t>(x[base + start]);
        double& n_u = count[unit];
        double& mean_u = mean[unit];
        double& m2_u = m2[unit];
        for (int64_t s = start; s < stop; s += kChunk) {
          const int64_t n_values = std::min(kChunk, stop - s);
          // The one parameter is a single value here, read as channel 0 of a one-value array.
          const double sum = sum_segment<scalar_t, 1, 1, 1, 0>(base + s, n_values, 0, {x}, {&shift}, {}, deviations)[0];
          const double chunk_mean = static_cast<double>(shift) + sum / n_values;
          const opmath_t centre = static_cast<opmath_t>(chunk_mean);
          const double sum_squares =
              sum_segment<scalar_t, 1, 1, 1, 0>(base + s, n_values, 0, {x}, {&centre}, {}, squares)[0];
          const double offset = chunk_mean - static_cast<double>(centre);
          detail::chan_merge(n_u, mean_u, m2_u, n_values, chunk_mean, sum_squares - n_values * offset * offset);
        }
      }
    }
  });

  Moments result{std::vector<double>(v.c, 0.0), std::vector<double>(v.c, 0.0)};
  if (v.channels_last()) {
    // Ranges of channels in parallel, each merging the units in their order (the result does not depend on the
    // split). Every channel of a row range has the same count: the merge's weights once per unit, no division per
    // channel (as for the chunks above).
    at::parallel_for(0, v.c, merge_grain(2 * units), [&](int64_t c0, int64_t c1) {
      double n = 0;
      for (int64_t unit = 0; unit < units; ++unit) {
        const double nb = count[unit];
        if (nb == 0) continue;
        const double sum = n + nb, weight = nb / sum, cross = n * nb / sum;
        const double* mean_u = mean.get() + unit * slots;
        const double* m2_u = m2.get() + unit * slots;
        for (int64_t c = c0; c < c1; ++c) {
          const double delta = mean_u[c] - result.mean[c];
          result.mean[c] += delta * weight;
          result.m2[c] += m2_u[c] + delta * delta * cross;
        }
        n = sum;
      }
    });
    return result;
  }
  std::vector<double> total(v.c, 0.0);
  for (int64_t unit = 0; unit < units; ++unit) {
    if (count[unit] > 0) {
      const int64_t c = plan.channel(v, unit);
      detail::chan_merge(total[c], result.mean[c], result.m2[c], count[unit], mean[unit], m2[unit]);
    }
  }
  return result;
}

}  // namespace resnet_fused::cpu
