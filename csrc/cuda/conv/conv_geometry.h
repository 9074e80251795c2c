// The address math of the CUDA convolution kernels, as __host__ __device__ functions: the kernels
// (conv_mma_sm80.cu, conv_direct.cu) compute every address with them, and the test-only op in
// conv_host_check.cpp runs them on the CPU, where tests/test_cuda_conv_geometry.py compares them with
// PyTorch's unfold and with the PTX fragment layouts. Plain C++ when the host compiler reads it; no torch
// or CUDA headers, so the CUTLASS translation units can include it too.
//
// The convolution as an implicit GEMM over NHWC tensors:
//   M = N*P*Q output pixels (rows), N = K output channels (columns), reduction over the taps (r, s) and the
//   input channels c, walked tap by tap in tiles of kBlockK channels (the channel tail is masked per
//   16-byte chunk, so C must be a multiple of 8 on the tensor-core path).
//   A[m][(r,s,c)] = x[n][p*stride_h - pad_h + r*dil_h][q*stride_w - pad_w + s*dil_w][c]   (0 in the padding)
//   B[k][(r,s,c)] = weight[k][r][s][c]   (OHWI, i.e. the channels_last storage of a KCRS weight)
//   out[m][k]     = act(sum A*B + bias[k] + residual[m][k])   at out + m*K + k (NHWC)
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define RF_CONV_HD __host__ __device__ __forceinline__
#else
#define RF_CONV_HD inline
#endif

namespace resnet_fused::cuda::conv {

// Sizes fit in int32 (the host checks it); offsets into the tensors are int64.
struct Problem {
  int32_t n, h, w, c;  // input, NHWC
  int32_t k, r, s;     // filter: K output channels, R x S taps, C input channels
  int32_t p, q;        // output height and width
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  RF_CONV_HD int64_t gemm_m() const { return static_cast<int64_t>(n) * p * q; }
};

RF_CONV_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the A operand: output pixels and the input they read ----

// An output pixel (row m of the GEMM) and the input coordinate of its (0, 0) tap.
struct Pixel {
  int32_t n, h0, w0;
};

// m < 2^31 (the tensor-core path requires it), so the divisions stay 32-bit.
RF_CONV_HD Pixel output_pixel(const Problem& pr, int32_t m) {
  const int32_t q = m % pr.q, t = m / pr.q;
  const int32_t p = t % pr.p, n = t / pr.p;
  return {n, p * pr.stride_h - pr.pad_h, q * pr.stride_w - pr.pad_w};
}

// Offset in x of the input element that tap (r, s), channel c of `px` multiplies; -1 in the padding or
// past the channels (the kernels load zeros there).
RF_CONV_HD int64_t activation_offset(const Problem& pr, const Pixel& px, int32_t r, int32_t s, int32_t c) {
  const int32_t h = px.h0 + r * pr.dil_h, w = px.w0 + s * pr.dil_w;
  if (h < 0 || h >= pr.h || w < 0 || w >= pr.w || c >= pr.c) return -1;
  return ((static_cast<int64_t>(px.n) * pr.h + h) * pr.w + w) * pr.c + c;
}

// ---- the B operand: the filter ----

// Offset in the OHWI weight of output channel k, tap (r, s), input channel c; -1 past K or C.
RF_CONV_HD int64_t filter_offset(const Problem& pr, int32_t k, int32_t r, int32_t s, int32_t c) {
  if (k >= pr.k || c >= pr.c) return -1;
  return ((static_cast<int64_t>(k) * pr.r + r) * pr.s + s) * pr.c + c;
}

// ---- the reduction: tap by tap, kBlockK channels at a time ----

struct KTile {
  int32_t r, s, c0;
};

RF_CONV_HD int32_t k_tiles(const Problem& pr, int32_t block_k) {
  return pr.r * pr.s * static_cast<int32_t>(ceil_div(pr.c, block_k));
}

// Tile t covers channels [c0, c0 + block_k) of tap (r, s); taps in row-major order.
RF_CONV_HD KTile k_tile(const Problem& pr, int32_t t, int32_t block_k) {
  const int32_t per_tap = static_cast<int32_t>(ceil_div(pr.c, block_k));
  const int32_t tap = t / per_tap;
  return {tap / pr.s, tap % pr.s, (t % per_tap) * block_k};
}

// ---- the epilogue ----

// Offset of GEMM element (m, k) in the NHWC output and residual.
RF_CONV_HD int64_t output_offset(const Problem& pr, int64_t m, int32_t k) { return m * pr.k + k; }

// The epilogue on the accumulator: act(acc + bias + residual), bias and residual already in the
// accumulation type (0 where absent). `v < 0` lets NaN through, as torch.relu does.
template <typename Acc>
RF_CONV_HD Acc epilogue_value(Acc acc, Acc bias, Acc residual, bool relu) {
  const Acc v = acc + bias + residual;
  return relu && v < Acc(0) ? Acc(0) : v;
}

// ---- tile scheduling ----

struct TileCoord {
  int32_t m, n;
};

// Block `block` of a 1-D grid of tiles_m * tiles_n blocks -> its output tile. Blocks run in groups of
// `group_m` tile rows, column by column inside a group (Triton's grouped ordering), so the blocks resident
// at one time share their filter tiles and input rows in L2.
// 32-bit arithmetic: a grid has fewer than 2^31 blocks (64-bit division is a subroutine call on the GPU).
RF_CONV_HD TileCoord tile_of_block(int32_t block, int32_t tiles_m, int32_t tiles_n, int32_t group_m) {
  const int32_t per_group = group_m * tiles_n;
  const int32_t group = block / per_group, first_m = group * group_m;
  const int32_t rows = tiles_m - first_m < group_m ? tiles_m - first_m : group_m;
  const int32_t in_group = block - group * per_group;
  return {first_m + in_group % rows, in_group / rows};
}

// ---- shared memory and the warp-level data layout of conv_mma_sm80.cu ----
//
// A stage holds an A tile (block_m rows) and a B tile (block_n rows), each row kBlockK = 32 elements of
// 16 bits = 4 chunks of 16 bytes. Chunk j of row `row` is stored at chunk j ^ ((row >> 1) & 3): the eight
// rows one ldmatrix phase reads at one logical chunk then fall into eight different 16-byte bank groups
// (two 64-byte rows share a 128-byte line), so ldmatrix and cp.async run without bank conflicts.
constexpr int32_t kBlockK = 32;
constexpr int32_t kChunkElems = 8;  // 16 bytes of a 16-bit type
constexpr int32_t kChunksPerRow = kBlockK / kChunkElems;

RF_CONV_HD int32_t smem_offset(int32_t row, int32_t chunk) {
  return row * kBlockK + ((chunk ^ ((row >> 1) & 3)) * kChunkElems);
}

// A (row, column) pair inside a tile; the column counts 16-byte chunks or elements, as each function says.
struct Coord {
  int32_t row, col;
};

// The (row, chunk) of a tile that thread `thread` of `threads` copies in its i-th 16-byte cp.async.

RF_CONV_HD Coord loader_coord(int32_t thread, int32_t i, int32_t threads) {
  return {thread / kChunksPerRow + i * (threads / kChunksPerRow), thread % kChunksPerRow};
}

// ldmatrix.x4 row addresses for one mma.m16n8k16 step at k16 step `ks` (0 or 1) of a 32-wide tile.
// A (16 rows of a warp's m16 tile): lanes 0-7 rows 0-7 k 0-7, lanes 8-15 rows 8-15 k 0-7, lanes 16-23
// rows 0-7 k 8-15, lanes 24-31 rows 8-15 k 8-15: the four registers are a0a1, a2a3, a4a5, a6a7.
RF_CONV_HD Coord a_fragment_row(int32_t lane, int32_t ks) {
  return {(lane & 7) + ((lane >> 3) & 1) * 8, ks * 2 + (lane >> 4)};
}
// B (16 output channels = two n8 tiles): lanes 0-7 n 0-7 k 0-7, 8-15 n 0-7 k 8-15, 16-23 n 8-15 k 0-7,
// 24-31 n 8-15 k 8-15: registers b0b1, b2b3 of the first n8 tile, then of the second.
RF_CONV_HD Coord b_fragment_row(int32_t lane, int32_t ks) {
  return {(lane & 7) + (lane >> 4) * 8, ks * 2 + ((lane >> 3) & 1)};
}

// Element i (0..3) of a lane's mma.m16n8k16 accumulator -> (row, element column) in the 16 x 8 tile.
RF_CONV_HD Coord accumulator_coord(int32_t lane, int32_t i) {
  return {(lane >> 2) + (i >> 1) * 8, (lane & 3) * 2 + (i & 1)};
}

// A tile configuration of the tensor-core kernel: block_m x block_n outputs per block, warps_m x warps_n
// warps, each computing a (block_m / warps_m) x (block_n / warps_n) warp tile of m16n8 mma tiles.
struct TileShape {
  int32_t block_m, block_n, warps_m, warps_n, stages;

  constexpr RF_CONV_HD int32_t threads() const { return warps_m * warps_n * 32; }
  constexpr RF_CONV_HD int32_t warp_tile_m() const { return block_m / warps_m; }
  constexpr RF_CONV_HD int32_t warp_tile_n() const { return block_n / warps_n; }
  // Warp w's tile origin (row, element column) within the block tile: warps are numbered along M first.
  constexpr RF_CONV_HD Coord warp_origin(int32_t warp) const {
    return {(warp % warps_m) * warp_tile_m(), (warp / warps_m) * warp_tile_n()};
  }
  constexpr RF_CONV_HD int32_t smem_elems() const { return stages * (block_m + block_n) * kBlockK; }
};

// The tile shapes conv_mma_sm80.cu instantiates; the host picks one per problem (conv_dispatch.cpp).
constexpr TileShape kLargeTile{128, 128, 2, 4, 4};  // 256 threads, 64 x 32 warp tiles, 64 KiB of smem
constexpr TileShape kSmallTile{64, 64, 2, 2, 4};    // 128 threads, 32 x 32 warp tiles, 32 KiB of smem
// Tile rows per group in the block order (tile_of_block).
constexpr int32_t kGroupM = 8;

}  // namespace resnet_fused::cuda::conv
