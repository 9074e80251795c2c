// The partition and the statistics math of the CUDA bn_act kernels (bn_act.cu), as __host__ __device__
// functions: the host side (register_cuda.cpp) plans launches and sizes workspaces with them, and the
// test-only op in bn_act_host_check.cpp runs the kernels' exact reduction order on the CPU with them.
// Plain C++ when the host compiler reads it.
//
// Both layouts are cut into tiles; a tile is one block's work and yields one partial result per channel:
//   NHWC, seen as rows (N*H*W) x C: a tile is a range of rows x a band of channels; the block is
//     block_x lanes over channel vectors by block_y lanes over rows; grid (bands, tiles).
//   NCHW, seen as N planes x C x S pixels: a tile is a range of planes x a chunk of pixels of one channel;
//     the block is 1 x 256 threads walking the tile's vectors in storage order; grid (C, tiles).
// Partials are stored channel-major ([C][tiles]) and combined per channel by a finalize kernel in a fixed
// order, so results do not depend on scheduling (no floating-point atomics).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace resnet_fused::cuda::bn {

constexpr int kThreads = 256;            // threads of every stats and elementwise block
constexpr int kFinalizeWarps = 8;        // finalize blocks: one warp per channel
constexpr int64_t kMaxGridY = 65535;
// NHWC reductions: rows per thread at least, so the partials (8 bytes per channel and tile) stay small
// next to the tile's data (at most 1/8 of it for float16, C >= 256).
constexpr int64_t kMinReductionRowsPerThread = 4;

RF_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
RF_HOST_DEVICE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// q = a / b, r = a % b for 0 <= a < 2^31 and b > 0, without 64-bit division (a subroutine call on the
// GPU, whose calling convention makes ptxas spill).
RF_HOST_DEVICE void small_divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (a < b) {
    q = 0;
    r = a;
  } else {  // b <= a < 2^31
    q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    r = a - q * b;
  }
}

// Length of chunk i when `total` items are cut into chunks of `len` (0 past the end).
RF_HOST_DEVICE int64_t chunk_length(int64_t i, int64_t len, int64_t total) {
  const int64_t begin = i * len, end = begin + len < total ? begin + len : total;
  return end > begin ? end - begin : 0;
}

struct TilePlan {
  bool channels_last;
  int vec;                  // elements per vector access: 1, or 16 bytes' worth
  int block_x, block_y;     // block shape; block_x * block_y == kThreads
  int64_t channels;
  int64_t rows;             // NHWC: N*H*W rows of C channels; NCHW: N planes per channel
  int64_t inner;            // NCHW: S = H*W pixels per plane; NHWC: 1
  int64_t bands;            // grid.x: NHWC bands of block_x * vec channels; NCHW: C
  int64_t rows_per_tile, row_tiles;
  int64_t inner_per_chunk, inner_chunks;  // NCHW: pixel chunks of a plane (a multiple of vec); NHWC: 1, 1

  // Tiles per channel: grid.y, and the number of partial results per channel.
  RF_HOST_DEVICE int64_t tiles() const { return row_tiles * inner_chunks; }
  // How many values of each channel tile g covers: the count its partial result stands for.
  RF_HOST_DEVICE int64_t tile_count(int64_t g) const {
    if (inner_chunks == 1) return chunk_length(g, rows_per_tile, rows) * inner;
    int64_t row_tile, chunk;
    small_divmod(g, inner_chunks, row_tile, chunk);  // g < kMaxGridY
    return chunk_length(row_tile, rows_per_tile, rows) * chunk_length(chunk, inner_per_chunk, inner);
  }
  RF_HOST_DEVICE int64_t count() const { return rows * inner; }  // values per channel
};

// Elements per vector access: 16 bytes when the innermost extent of the layout (C for NHWC, S for NCHW)
// is a multiple of it and every pointer is 16-byte aligned; float64 takes the scalar path.
inline int vector_width(bool channels_last, int64_t c, int64_t s, int element_size, bool aligned16) {
  if (element_size >= 8) return 1;
  const int vec = 16 / element_size;
  return aligned16 && (channels_last ? c : s) % vec == 0 ? vec : 1;
}

// The partition of an (n, c, s) tensor for about `target_blocks` blocks (a wave: SMs x resident blocks).
// `reduction`: the plan of a pass that writes partials (NHWC tiles then take >= 4 rows per thread).
inline TilePlan make_plan(bool channels_last, int64_t n, int64_t c, int64_t s, int vec, int64_t target_blocks,
                          bool reduction) {
  TilePlan p{};
  p.channels_last = channels_last;
  p.vec = vec;
  p.channels = c;
  // Bounded so that the tile count (at most 2 x target, see below) stays within grid.y.
  target_blocks = target_blocks < 1 ? 1 : target_blocks > kMaxGridY / 2 ? kMaxGridY / 2 : target_blocks;
  p.inner_per_chunk = 1;
  p.inner_chunks = 1;
  if (channels_last) {
    p.rows = n * s;
    p.inner = 1;
    const int64_t vectors = ceil_div(c, vec);  // channel vectors per row
    int bx = 1;
    while (bx < 32 && bx < vectors) bx *= 2;  // at most one warp across a row: 512 contiguous bytes
    p.block_x = bx;
    p.block_y = kThreads / bx;
    p.bands = ceil_div(c, int64_t(bx) * vec);
    const int64_t want = p.bands > 0 && target_blocks / p.bands > 0 ? target_blocks / p.bands : 1;
    p.rows_per_tile = p.rows > 0 ? round_up(ceil_div(p.rows, want), p.block_y) : p.block_y;
    if (reduction && p.rows_per_tile < kMinReductionRowsPerThread * p.block_y) {
      p.rows_per_tile = kMinReductionRowsPerThread * p.block_y;
    }
    p.row_tiles = ceil_div(p.rows, p.rows_per_tile);  // <= want
  } else {
    p.rows = n;
    p.inner = s;
    p.block_x = 1;
    p.block_y = kThreads;
    p.bands = c;
    const int64_t want = c > 0 && target_blocks / c > 0 ? target_blocks / c : 1;
    if (n == 0 || s == 0) {
      p.rows_per_tile = 1;
      p.row_tiles = 0;
      p.inner_per_chunk = s > 0 ? s : 1;
    } else if (want <= n) {
      // Enough planes: tiles of whole planes.
      p.rows_per_tile = ceil_div(n, want);
      p.row_tiles = ceil_div(n, p.rows_per_tile);
      p.inner_per_chunk = s;
    } else {
      // Few planes (small batch, few channels): cut each plane into chunks of at least one vector per
      // thread; n * chunks < want + n <= 2 * want.
      p.rows_per_tile = 1;
      p.row_tiles = n;
      int64_t chunks = ceil_div(want, n);
      const int64_t max_chunks = ceil_div(s, int64_t(kThreads) * vec);
      chunks = chunks < max_chunks ? chunks : max_chunks;
      p.inner_per_chunk = round_up(ceil_div(s, chunks), vec);
      p.inner_chunks = ceil_div(s, p.inner_per_chunk);
    }
  }
  return p;
}

// One thread's walk over an NCHW tile: the tile's planes x (chunk pixels / vec) vectors in storage order,
// thread t taking vectors t, t + step, ... (t < step <= kThreads); `offset` is the element offset of the
// current vector. Only the start divides, in 32 bits; each step is additions, whatever the plane size.
struct PlaneCursor {
  int64_t plane, vector, offset;    // position in the tile, and in memory
  int64_t planes, vectors;          // the tile's extent
  int64_t step_planes, step_vectors, step_offset, wrap_offset;

  RF_HOST_DEVICE static PlaneCursor start(const TilePlan& p, int64_t tile, int64_t channel, int64_t first,
                                          int64_t step) {
    PlaneCursor q;
    int64_t row_tile, chunk;
    small_divmod(tile, p.inner_chunks, row_tile, chunk);  // tile < kMaxGridY
    const int64_t plane0 = row_tile * p.rows_per_tile, pixel0 = chunk * p.inner_per_chunk;
    const int64_t plane_stride = p.channels * p.inner;
    q.planes = chunk_length(row_tile, p.rows_per_tile, p.rows);
    q.vectors = chunk_length(chunk, p.inner_per_chunk, p.inner) / p.vec;
    small_divmod(first, q.vectors, q.plane, q.vector);
    q.offset = (plane0 + q.plane) * plane_stride + channel * p.inner + pixel0 + q.vector * p.vec;
    small_divmod(step, q.vectors, q.step_planes, q.step_vectors);
    q.step_offset = q.step_planes * plane_stride + q.step_vectors * p.vec;
    q.wrap_offset = plane_stride - q.vectors * p.vec;
    return q;
  }
  RF_HOST_DEVICE bool valid() const { return plane < planes; }
  RF_HOST_DEVICE void advance() {
    plane += step_planes;
    vector += step_vectors;
    offset += step_offset;
    if (vector >= vectors) {
      vector -= vectors;
      ++plane;
      offset += wrap_offset;
    }
  }
};

// ---- Statistics: Welford per thread, Chan et al.'s combination between threads, tiles and lanes ----

// 1/x for a count x >= 1. On the GPU the hardware reciprocal (within 2 ulp): IEEE division has a
// slow-path subroutine whose calling convention makes ptxas spill in the hot loops. float64 divides.
RF_HOST_DEVICE float reciprocal(float x) {
#ifdef __CUDA_ARCH__
  return __fdividef(1.0f, x);
#else
  return 1.0f / x;
#endif
}
RF_HOST_DEVICE double reciprocal(double x) { return 1.0 / x; }

// Welford's update by one value, given 1/n for the count n after the update (one reciprocal serves a
// whole row of channels in NHWC).
template <typename T>
RF_HOST_DEVICE void welford_add(T& mean, T& m2, T x, T inv_n) {
  const T delta = x - mean;
  mean += delta * inv_n;
  m2 += delta * (x - mean);
}

// (mean, m2) over n values absorbs (mean_b, m2_b) over n_b values (Chan, Golub and LeVeque); the caller
// adds n_b to n. Each added term is non-negative, so m2 never goes below zero.
template <typename T>
RF_HOST_DEVICE void chan_combine(T& mean, T& m2, int64_t n, T mean_b, T m2_b, int64_t n_b) {
  if (n_b == 0) return;
  if (n == 0) {
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const T frac_b = static_cast<T>(n_b) * reciprocal(static_cast<T>(n + n_b));
  const T delta = mean_b - mean;
  mean += delta * frac_b;
  m2 += m2_b + delta * delta * static_cast<T>(n) * frac_b;
}

// Mean and m2 of k values held in registers: two passes, so the deviations are exact before squaring.
template <typename T>
RF_HOST_DEVICE void local_stats(const T* v, int k, T& mean, T& m2) {
  T sum = 0;
  for (int i = 0; i < k; ++i) sum += v[i];
  mean = sum * (T(1) / static_cast<T>(k));  // k is a power of two: exact
  m2 = 0;
  for (int i = 0; i < k; ++i) m2 += (v[i] - mean) * (v[i] - mean);
}

// The per-channel results of the forward finalize, in double (C values: the cost does not matter).
// Training normalizes with the biased variance and updates running_var with the unbiased one, as
// F.batch_norm does; the host rejects count == 1 in training.
RF_HOST_DEVICE double biased_variance(double m2, int64_t count) { return m2 / static_cast<double>(count); }
RF_HOST_DEVICE double unbiased_variance(double m2, int64_t count) { return m2 / static_cast<double>(count - 1); }
RF_HOST_DEVICE double inverse_std(double var, double eps) { return 1.0 / ::sqrt(var + eps); }
RF_HOST_DEVICE double running_update(double running, double batch, double momentum) {
  return (1.0 - momentum) * running + momentum * batch;
}

// Workspace elements (in the accumulation type) of the forward and backward passes.
RF_HOST_DEVICE int64_t forward_workspace_size(const TilePlan& p, bool training) {
  return (training ? 2 * p.channels * p.tiles() : 0) + 2 * p.channels;  // partial (mean, m2); scale, shift
}
RF_HOST_DEVICE int64_t backward_workspace_size(const TilePlan& p) {
  return 2 * p.channels * p.tiles() + 3 * p.channels;  // partial sums; per-channel coefficients (3 x C)
}

}  // namespace resnet_fused::cuda::bn
