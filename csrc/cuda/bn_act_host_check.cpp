// Test-only: runs the CUDA bn_act statistics on the CPU with the kernels' own partition and arithmetic
// (bn_act_plan.h), in the kernels' order: per-thread Welford, the block tree, one partial per tile and
// channel, then the finalize's 32 lanes and shuffle tree. CI has no GPU; this is how it checks that the
// tiles cover every element exactly once, that the counts the finalize assumes are the counts the threads
// saw, and that the statistics stay accurate where E[x^2] - E[x]^2 would not (tests/test_cuda_bn_act.py).
// Registered for the CPU dispatch key by the CUDA library; not part of the API.
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bn_act_plan.h"

namespace resnet_fused::cuda {
namespace {

struct Welford {
  float mean = 0, m2 = 0;
  int64_t n = 0;
};

void absorb(Welford& a, const Welford& b) {
  bn::chan_combine(a.mean, a.m2, a.n, b.mean, b.m2, b.n);
  a.n += b.n;
}

// welford_over_y's tree and the finalize's shuffle tree: element i absorbs i + half, half = size/2 .. 1.
void fold(std::vector<Welford>& s) {
  for (size_t half = s.size() / 2; half > 0; half /= 2)
    for (size_t i = 0; i < half; ++i) absorb(s[i], s[i + half]);
}

// Returns (plan, tile_counts, visits, mean, var): plan = [channels_last, vec, block_x, block_y, bands,
// rows_per_tile, row_tiles, inner_per_chunk, inner_chunks, tiles]; tile_counts[g] = plan.tile_count(g);
// visits: how often the stats pass reads each element, in storage order; mean and biased var per channel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_host_check(
    const at::Tensor& x_in, bool channels_last, int64_t vec, int64_t target_blocks) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "_cuda_bn_host_check: x must be a 4-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t n = x.size(0), channels = x.size(1), s = x.size(2) * x.size(3);
  TORCH_CHECK(vec == 1 || (vec > 1 && vec <= 16 && (channels_last ? channels : s) % vec == 0),
              "_cuda_bn_host_check: vec must be 1, or at most 16 and divide ", channels_last ? "C" : "H*W");
  const bn::TilePlan plan =
      bn::make_plan(channels_last, n, channels, s, static_cast<int>(vec), target_blocks, /*reduction=*/true);
  const int64_t tiles = plan.tiles();
  const float* xp = x.const_data_ptr<float>();
  at::Tensor visits = at::zeros({x.numel()}, x.options().dtype(at::kInt));
  int32_t* seen = visits.data_ptr<int32_t>();
  std::vector<Welford> partial(channels * tiles);  // [channel][tile], as the kernels store them

  if (channels_last) {  // bn_stats_nhwc_kernel
    for (int64_t g = 0; g < tiles; ++g) {
      const int64_t row_end = std::min(plan.rows, (g + 1) * plan.rows_per_tile);
      for (int64_t band = 0; band < plan.bands; ++band) {
        for (int tx = 0; tx < plan.block_x; ++tx) {
          const int64_t c0 = (band * plan.block_x + tx) * vec;
          if (c0 >= channels) continue;
          std::vector<std::vector<Welford>> lanes(vec, std::vector<Welford>(plan.block_y));
          for (int ty = 0; ty < plan.block_y; ++ty) {
            int64_t count = 0;
            for (int64_t row = g * plan.rows_per_tile + ty; row < row_end; row += plan.block_y) {
              const float inv_n = bn::reciprocal(static_cast<float>(++count));
              for (int64_t k = 0; k < vec; ++k) {
                Welford& w = lanes[k][ty];
                bn::welford_add(w.mean, w.m2, xp[row * channels + c0 + k], inv_n);
                w.n = count;
                ++seen[row * channels + c0 + k];
              }
            }
          }
          for (int64_t k = 0; k < vec; ++k) {
            fold(lanes[k]);
            partial[(c0 + k) * tiles + g] = lanes[k][0];
          }
        }
      }
    }
  } else {  // bn_stats_nchw_kernel
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t g = 0; g < tiles; ++g) {
        std::vector<Welford> threads(plan.block_y);
        for (int t = 0; t < plan.block_y; ++t) {
          Welford& w = threads[t];
          for (auto q = bn::PlaneCursor::start(plan, g, c, t, plan.block_y); q.valid(); q.advance()) {
            TORCH_CHECK(q.offset >= 0 && q.offset + vec <= x.numel(), "_cuda_bn_host_check: tile ", g, " of channel ",
                        c, " reads at ", q.offset, ", outside the tensor");
            float v[16];
            for (int64_t k = 0; k < vec; ++k) {
              v[k] = xp[q.offset + k];
              ++seen[q.offset + k];
            }
            if (vec == 1) {
              ++w.n;
              bn::welford_add(w.mean, w.m2, v[0], bn::reciprocal(static_cast<float>(w.n)));
            } else {
              Welford b;
              bn::local_stats(v, static_cast<int>(vec), b.mean, b.m2);
              b.n = vec;
              absorb(w, b);
            }
          }
        }
        fold(threads);
        partial[c * tiles + g] = threads[0];
      }
    }
  }

  // bn_forward_finalize_kernel: lane l folds tiles l, l + 32, ... with the counts of the plan.
  at::Tensor mean = at::empty({channels}, x.options());
  at::Tensor var = at::empty({channels}, x.options());
  for (int64_t c = 0; c < channels; ++c) {
    std::vector<Welford> lanes(32);
    for (int64_t lane = 0; lane < 32; ++lane) {
      for (int64_t g = lane; g < tiles; g += 32) {
        const Welford& p = partial[c * tiles + g];
        TORCH_CHECK(p.n == plan.tile_count(g), "_cuda_bn_host_check: tile ", g, " of channel ", c, " saw ", p.n,
                    " values, but the plan counts ", plan.tile_count(g));
        absorb(lanes[lane], p);
      }
    }
    fold(lanes);
    TORCH_CHECK(lanes[0].n == plan.count(), "_cuda_bn_host_check: channel ", c, " counted ", lanes[0].n,
                " values, expected ", plan.count());
    mean.data_ptr<float>()[c] = lanes[0].mean;
    var.data_ptr<float>()[c] = lanes[0].n > 0 ? static_cast<float>(bn::biased_variance(lanes[0].m2, lanes[0].n)) : 0.f;
  }

  const int64_t fields[] = {plan.channels_last, plan.vec, plan.block_x, plan.block_y, plan.bands,
                            plan.rows_per_tile, plan.row_tiles, plan.inner_per_chunk, plan.inner_chunks, tiles};
  at::Tensor plan_fields = at::empty({10}, x.options().dtype(at::kLong));
  std::copy(std::begin(fields), std::end(fields), plan_fields.data_ptr<int64_t>());
  at::Tensor tile_counts = at::empty({tiles}, x.options().dtype(at::kLong));
  for (int64_t g = 0; g < tiles; ++g) tile_counts.data_ptr<int64_t>()[g] = plan.tile_count(g);
  return {plan_fields, tile_counts, visits, mean, var};
}

}  // namespace
}  // namespace resnet_fused::cuda

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def(
      "_cuda_bn_host_check(Tensor x, bool channels_last, int vec, int target_blocks) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("_cuda_bn_host_check", &resnet_fused::cuda::bn_host_check);
}
