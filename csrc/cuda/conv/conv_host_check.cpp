// Test-only: the CUDA conv kernels' address math (conv_geometry.h) run on the CPU. CI has no GPU; these
// ops are how tests/test_cuda_conv_geometry.py checks, against PyTorch's unfold and the PTX ISA's fragment
// layouts, that the kernels read the right inputs, cover every output tile once, and feed mma.sync the
// right fragments. Registered for the CPU dispatch key by the CUDA library; not part of the API.
#include <array>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "conv_geometry.h"

namespace resnet_fused::cuda::conv {
namespace {

Problem problem_of(at::IntArrayRef x_shape, at::IntArrayRef w_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  TORCH_CHECK(x_shape.size() == 4 && w_shape.size() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "_cuda_conv_host_check: x_shape and w_shape are (N, C, H, W) and (K, C, R, S)");
  Problem pr{};
  pr.n = x_shape[0], pr.c = x_shape[1], pr.h = x_shape[2], pr.w = x_shape[3];
  pr.k = w_shape[0], pr.r = w_shape[2], pr.s = w_shape[3];
  TORCH_CHECK(w_shape[1] == pr.c, "_cuda_conv_host_check: groups=1 only");
  pr.stride_h = stride[0], pr.stride_w = stride[1], pr.pad_h = padding[0], pr.pad_w = padding[1];
  pr.dil_h = dilation[0], pr.dil_w = dilation[1];
  pr.p = (pr.h + 2 * pr.pad_h - pr.dil_h * (pr.r - 1) - 1) / pr.stride_h + 1;
  pr.q = (pr.w + 2 * pr.pad_w - pr.dil_w * (pr.s - 1) - 1) / pr.stride_w + 1;
  TORCH_CHECK(pr.p > 0 && pr.q > 0, "_cuda_conv_host_check: empty output");
  return pr;
}

// The kernels' operand gathers, chunk by chunk as conv_mma_kernel copies them: a[m][t * kBlockK + j] =
// offset in the NHWC x of the element that output pixel m multiplies in k-tile t at channel lane j (-1:
// zero-filled), b[k][t * kBlockK + j] = offset in the OHWI weight, and the output shape (P, Q). The kernel
// computes one offset per 16-byte chunk (lane j / 8) and copies 8 consecutive elements from it, so the
// gathers equal the convolution's only when C is a multiple of 8, which the dispatcher requires.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather(at::IntArrayRef x_shape, at::IntArrayRef w_shape,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation) {
  const Problem pr = problem_of(x_shape, w_shape, stride, padding, dilation);
  const int32_t tiles = k_tiles(pr, kBlockK);
  const int64_t cols = static_cast<int64_t>(tiles) * kBlockK;
  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor a = at::empty({pr.gemm_m(), cols}, opts), b = at::empty({pr.k, cols}, opts);
  int64_t* ap = a.data_ptr<int64_t>();
  int64_t* bp = b.data_ptr<int64_t>();
  auto element = [](int64_t chunk_offset, int32_t j) { return chunk_offset < 0 ? -1 : chunk_offset + j % kChunkElems; };
  for (int32_t t = 0; t < tiles; ++t) {
    const KTile kt = k_tile(pr, t, kBlockK);
    for (int32_t j = 0; j < kBlockK; ++j) {
      const int32_t c = kt.c0 + (j / kChunkElems) * kChunkElems;  // the chunk's first channel
      for (int64_t m = 0; m < pr.gemm_m(); ++m)
        ap[m * cols + t * kBlockK + j] =
            element(activation_offset(pr, output_pixel(pr, static_cast<int32_t>(m)), kt.r, kt.s, c), j);
      for (int32_t k = 0; k < pr.k; ++k) bp[k * cols + t * kBlockK + j] = element(filter_offset(pr, k, kt.r, kt.s, c), j);
    }
  }
  at::Tensor pq = at::empty({2}, opts);
  pq.data_ptr<int64_t>()[0] = pr.p;
  pq.data_ptr<int64_t>()[1] = pr.q;
  return {a, b, pq};
}

// tile_of_block over a whole grid: row i = (tile m, tile n) of block i.
at::Tensor tile_order(int64_t tiles_m, int64_t tiles_n, int64_t group_m) {
  at::Tensor order = at::empty({tiles_m * tiles_n, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t block = 0; block < tiles_m * tiles_n; ++block) {
    const TileCoord t = tile_of_block(static_cast<int32_t>(block), tiles_m, tiles_n, group_m);
    o[2 * block] = t.m;
    o[2 * block + 1] = t.n;
  }
  return order;
}

// ---- one block's k-tile through shared memory and the tensor cores, simulated ----
// What the PTX ISA says (written here independently of conv_geometry.h, which the kernel uses):
//   ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane t receives in register i
//     the elements (row t / 4, columns 2 (t % 4), 2 (t % 4) + 1) of matrix i.
//   mma.m16n8k16 .row.col, 16-bit inputs (g = lane / 4, c = lane % 4):
//     A register j holds a_{2j}, a_{2j+1}; a_i is at (row g + 8 ((i / 2) % 2), col 2c + (i % 2) + 8 (i / 4));
//     B register j holds b_{2j}, b_{2j+1}; b_i is at (k 2c + (i % 2) + 8 (i / 2), n g);
//     accumulator d_i is at (row g + 8 (i / 2), col 2c + (i % 2)).

struct Warp {
  std::array<std::array<float, 8>, 32> a;  // a_0..a_7 of each lane
  std::array<std::array<float, 4>, 32> b;  // b_0..b_3 of each lane (one n8 tile)
};

// ldmatrix.x4 from the simulated shared memory: the lanes' addresses (element offsets) -> each lane's
// four registers as 8 halves. Counts bank conflicts: a phase (one matrix) is conflict-free when its eight
// 16-byte rows fall into eight different 16-byte bank groups of a 128-byte line.
std::array<std::array<float, 8>, 32> ldmatrix_x4(const std::vector<float>& smem, const std::array<int32_t, 32>& addr,
                                                 int64_t& conflicts) {
  std::array<std::array<float, 8>, 32> regs{};
  for (int i = 0; i < 4; ++i) {
    bool group_used[8] = {};
    for (int l = 8 * i; l < 8 * i + 8; ++l) {
      TORCH_CHECK(addr[l] % kChunkElems == 0, "ldmatrix row address not 16-byte aligned");
      const int group = (addr[l] / kChunkElems) % 8;  // 16-byte bank group within 128 bytes
      if (group_used[group]) ++conflicts;
      group_used[group] = true;
    }
    for (int t = 0; t < 32; ++t) {
      const int row_lane = 8 * i + t / 4;
      regs[t][2 * i] = smem.at(addr[row_lane] + 2 * (t % 4));
      regs[t][2 * i + 1] = smem.at(addr[row_lane] + 2 * (t % 4) + 1);
    }
  }
  return regs;
}

// (c [block_m, block_n], conflicts, writes): one k-tile of the A tile a [block_m, 32] and the B tile
// b [block_n, 32] through the kernel's copy, ldmatrix and epilogue mappings; c should equal a @ b.T;
// writes[e] counts the cp.async writes to shared-memory element e (each must be 1).
std::tuple<at::Tensor, int64_t, at::Tensor> warp_sim(const at::Tensor& a_in, const at::Tensor& b_in, bool large) {
  const TileShape tile = large ? kLargeTile : kSmallTile;
  const at::Tensor a = a_in.contiguous().to(at::kFloat), b = b_in.contiguous().to(at::kFloat);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == tile.block_m && a.size(1) == kBlockK && b.dim() == 2 &&
                  b.size(0) == tile.block_n && b.size(1) == kBlockK,
              "_cuda_conv_warp_sim: a must be [", tile.block_m, ", 32] and b [", tile.block_n, ", 32]");
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();

  // cp.async: thread t's i-th chunk of each tile.
  std::vector<float> smem_a(tile.block_m * kBlockK, NAN), smem_b(tile.block_n * kBlockK, NAN);
  at::Tensor writes = at::zeros({(tile.block_m + tile.block_n) * kBlockK}, at::TensorOptions().dtype(at::kInt));
  int32_t* w = writes.data_ptr<int32_t>();
  auto copy = [&](const float* src, std::vector<float>& dst, int rows, int32_t* count) {
    for (int t = 0; t < tile.threads(); ++t) {
      for (int i = 0; i < rows * kChunksPerRow / tile.threads(); ++i) {
        const Coord rc = loader_coord(t, i, tile.threads());
        for (int e = 0; e < kChunkElems; ++e) {
          const int32_t off = smem_offset(rc.row, rc.col) + e;
          dst.at(off) = src[rc.row * kBlockK + rc.col * kChunkElems + e];
          ++count[off];
        }
      }
    }
  };
  copy(ap, smem_a, tile.block_m, w);
  copy(bp, smem_b, tile.block_n, w + tile.block_m * kBlockK);

  at::Tensor c = at::zeros({tile.block_m, tile.block_n}, a.options());
  float* cp = c.data_ptr<float>();
  int64_t conflicts = 0;
  for (int warp = 0; warp < tile.warps_m * tile.warps_n; ++warp) {
    const Coord origin = tile.warp_origin(warp);
    for (int mi = 0; mi < tile.warp_tile_m() / 16; ++mi) {
      for (int nj = 0; nj < tile.warp_tile_n() / 16; ++nj) {
        float d[2][32][4] = {};  // two n8 tiles
        for (int ks = 0; ks < kBlockK / 16; ++ks) {
          std::array<int32_t, 32> a_addr{}, b_addr{};
          for (int l = 0; l < 32; ++l) {
            const Coord ar = a_fragment_row(l, ks), br = b_fragment_row(l, ks);
            a_addr[l] = smem_offset(origin.row + mi * 16 + ar.row, ar.col);
            b_addr[l] = smem_offset(origin.col + nj * 16 + br.row, br.col);
          }
          const auto a_regs = ldmatrix_x4(smem_a, a_addr, conflicts);
          const auto b_regs = ldmatrix_x4(smem_b, b_addr, conflicts);
          // Reassemble the operands from the lanes per the PTX layouts, then multiply.
          float am[16][16], bm[2][16][8];
          for (int l = 0; l < 32; ++l) {
            const int g = l / 4, cc = l % 4;
            for (int i = 0; i < 8; ++i) am[g + 8 * ((i / 2) % 2)][2 * cc + (i % 2) + 8 * (i / 4)] = a_regs[l][i];
            for (int n8 = 0; n8 < 2; ++n8)  // registers 0,1 feed the first n8 tile, 2,3 the second
              for (int i = 0; i < 4; ++i) bm[n8][2 * cc + (i % 2) + 8 * (i / 2)][g] = b_regs[l][4 * n8 + i];
          }
          for (int n8 = 0; n8 < 2; ++n8)
            for (int l = 0; l < 32; ++l)
              for (int i = 0; i < 4; ++i) {
                const int row = l / 4 + 8 * (i / 2), col = 2 * (l % 4) + (i % 2);
                for (int kk = 0; kk < 16; ++kk) d[n8][l][i] += am[row][kk] * bm[n8][kk][col];
              }
        }
        // The kernel's epilogue placement.
        for (int n8 = 0; n8 < 2; ++n8)
          for (int l = 0; l < 32; ++l)
            for (int i = 0; i < 4; ++i) {
              const Coord rc = accumulator_coord(l, i);
              const int row = origin.row + mi * 16 + rc.row, col = origin.col + (nj * 2 + n8) * 8 + rc.col;
              cp[row * tile.block_n + col] += d[n8][l][i];
            }
      }
    }
  }
  return {c, conflicts, writes};
}

}  // namespace
}  // namespace resnet_fused::cuda::conv

// The ops without tensor inputs take one kernel for every dispatch key.
TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def("_cuda_conv_gather(int[] x_shape, int[] w_shape, int[] stride, int[] padding, int[] dilation) "
        "-> (Tensor, Tensor, Tensor)",
        &resnet_fused::cuda::conv::gather);
  m.def("_cuda_conv_tile_order(int tiles_m, int tiles_n, int group_m) -> Tensor",
        &resnet_fused::cuda::conv::tile_order);
  m.def("_cuda_conv_warp_sim(Tensor a, Tensor b, bool large) -> (Tensor, int, Tensor)");
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("_cuda_conv_warp_sim", &resnet_fused::cuda::conv::warp_sim);
}
