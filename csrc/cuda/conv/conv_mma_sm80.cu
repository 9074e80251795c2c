// conv_bn_act on tensor cores with mma.sync (sm_80 and later; the Hopper fallback for shapes the CUTLASS
// kernels refuse): an implicit GEMM over NHWC activations and OHWI filters, float16/bfloat16 in, float32
// accumulation, and the epilogue act(acc + bias + residual) applied to the accumulator before the one store.
//
// Per block: a block_m x block_n output tile. Per k-tile (one filter tap, 32 input channels), every thread
// copies 16-byte chunks of the A tile (input pixels, zero-filled in the padding) and the B tile (filter
// rows) into shared memory with cp.async, `stages` tiles in flight; warps read them with ldmatrix.x4 and
// multiply with mma.m16n8k16. All address math comes from conv_geometry.h, where it is tested on the CPU.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv_launch.h"

namespace resnet_fused::cuda::conv {
namespace {

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; with `valid` false the 16 bytes are zero-filled and nothing
// is read (src-size 0), which is how padding and tails are masked.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static float2 load2(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
  __device__ __forceinline__ static void store2(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static float2 load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  __device__ __forceinline__ static void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
};

// ---- the kernel ----

template <typename T, int kBlockM, int kBlockN, int kWarpsM, int kWarpsN, int kNumStages>
struct Config {
  static constexpr TileShape kTile{kBlockM, kBlockN, kWarpsM, kWarpsN, kNumStages};
  static constexpr int kStages = kNumStages;
  static constexpr int kThreads = kTile.threads();
  static constexpr int kMmaM = kTile.warp_tile_m() / 16, kMmaN = kTile.warp_tile_n() / 8;  // m16n8 tiles per warp
  static constexpr int kLoadsA = kBlockM * kChunksPerRow / kThreads;  // 16-byte copies per thread per tile
  static constexpr int kLoadsB = kBlockN * kChunksPerRow / kThreads;
  static constexpr int kSmemBytes = kTile.smem_elems() * static_cast<int>(sizeof(T));
  static_assert(kTile.warp_tile_m() % 16 == 0 && kTile.warp_tile_n() % 16 == 0,
                "warp tiles are made of m16 x n16 steps");
  static_assert(kLoadsA * kThreads == kBlockM * kChunksPerRow && kLoadsB * kThreads == kBlockN * kChunksPerRow,
                "every thread copies the same number of chunks");
  static_assert(kNumStages >= 2, "the pipeline needs two stages at least");
};

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    conv_mma_kernel(Problem pr, const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                    const T* __restrict__ residual, T* __restrict__ out, bool relu, int32_t tiles_m,
                    int32_t tiles_n) {
  extern __shared__ __align__(128) unsigned char smem_bytes[];
  T* const smem_a = reinterpret_cast<T*>(smem_bytes);
  T* const smem_b = smem_a + Cfg::kStages * Cfg::kTile.block_m * kBlockK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const TileCoord tile = tile_of_block(blockIdx.x, tiles_m, tiles_n, kGroupM);
  const int64_t m_block = static_cast<int64_t>(tile.m) * Cfg::kTile.block_m;
  const int32_t n_block = tile.n * Cfg::kTile.block_n;
  const int64_t gemm_m = pr.gemm_m();

  // The pixels and filter rows this thread copies, fixed over the whole reduction.
  Pixel pixels[Cfg::kLoadsA];
  bool pixel_valid[Cfg::kLoadsA];
#pragma unroll
  for (int i = 0; i < Cfg::kLoadsA; ++i) {
    const int64_t m = m_block + loader_coord(tid, i, Cfg::kThreads).row;
    pixel_valid[i] = m < gemm_m;
    pixels[i] = output_pixel(pr, pixel_valid[i] ? static_cast<int32_t>(m) : 0);
  }
  const int32_t chunk_channel = loader_coord(tid, 0, Cfg::kThreads).col * kChunkElems;

  auto load_tile = [&](int stage, int32_t kt) {
    const KTile k = k_tile(pr, kt, kBlockK);
    const int32_t c = k.c0 + chunk_channel;
    T* const a_stage = smem_a + stage * Cfg::kTile.block_m * kBlockK;
    T* const b_stage = smem_b + stage * Cfg::kTile.block_n * kBlockK;
#pragma unroll
    for (int i = 0; i < Cfg::kLoadsA; ++i) {
      const Coord rc = loader_coord(tid, i, Cfg::kThreads);
      const int64_t off = pixel_valid[i] ? activation_offset(pr, pixels[i], k.r, k.s, c) : -1;
      cp_async_16(a_stage + smem_offset(rc.row, rc.col), off >= 0 ? x + off : x, off >= 0);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kLoadsB; ++i) {
      const Coord rc = loader_coord(tid, i, Cfg::kThreads);
      const int64_t off = filter_offset(pr, n_block + rc.row, k.r, k.s, c);
      cp_async_16(b_stage + smem_offset(rc.row, rc.col), off >= 0 ? weight + off : weight, off >= 0);
    }
  };

  float acc[Cfg::kMmaM][Cfg::kMmaN][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kMmaN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  constexpr TileShape kTile = Cfg::kTile;  // a local copy: device code cannot odr-use the static member
  const Coord warp_origin = kTile.warp_origin(warp);
  const int32_t tiles_k = k_tiles(pr, kBlockK);

  // Prologue: stages - 1 tiles in flight (one commit group per tile, empty past the end).
#pragma unroll
  for (int st = 0; st < Cfg::kStages - 1; ++st) {
    if (st < tiles_k) load_tile(st, st);
    cp_async_commit();
  }

  for (int32_t kt = 0; kt < tiles_k; ++kt) {
    // Tile kt has landed once at most stages - 2 groups are pending; the barrier also tells every warp
    // that the stage refilled below was finished with in the previous iteration.
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int32_t next = kt + Cfg::kStages - 1;
    if (next < tiles_k) load_tile(next % Cfg::kStages, next);
    cp_async_commit();

    const int stage = kt % Cfg::kStages;
    const T* const a_stage = smem_a + stage * Cfg::kTile.block_m * kBlockK;
    const T* const b_stage = smem_b + stage * Cfg::kTile.block_n * kBlockK;
#pragma unroll
    for (int ks = 0; ks < kBlockK / 16; ++ks) {
      uint32_t a_frag[Cfg::kMmaM][4];
      uint32_t b_frag[Cfg::kMmaN][2];
#pragma unroll
      for (int i = 0; i < Cfg::kMmaM; ++i) {
        const Coord rc = a_fragment_row(lane, ks);
        ldmatrix_x4(a_frag[i], a_stage + smem_offset(warp_origin.row + i * 16 + rc.row, rc.col));
      }
#pragma unroll
      for (int j = 0; j < Cfg::kMmaN / 2; ++j) {
        const Coord rc = b_fragment_row(lane, ks);
        uint32_t r[4];
        ldmatrix_x4(r, b_stage + smem_offset(warp_origin.col + j * 16 + rc.row, rc.col));
        b_frag[2 * j][0] = r[0];
        b_frag[2 * j][1] = r[1];
        b_frag[2 * j + 1][0] = r[2];
        b_frag[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < Cfg::kMmaM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kMmaN; ++j) Mma<T>::run(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups remain; nothing may be in flight when the block exits

  // Epilogue: each lane holds pairs of adjacent output channels; K is even, so a pair is one 4-byte store.
#pragma unroll
  for (int i = 0; i < Cfg::kMmaM; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::kMmaN; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const Coord rc = accumulator_coord(lane, half * 2);
        const int64_t m = m_block + warp_origin.row + i * 16 + rc.row;
        const int32_t k = n_block + warp_origin.col + j * 8 + rc.col;
        if (m >= gemm_m || k >= pr.k) continue;
        const float2 b = bias ? Mma<T>::load2(bias + k) : make_float2(0.f, 0.f);
        const int64_t off = output_offset(pr, m, k);
        const float2 res = residual ? Mma<T>::load2(residual + off) : make_float2(0.f, 0.f);
        Mma<T>::store2(out + off, epilogue_value(acc[i][j][half * 2], b.x, res.x, relu),
                       epilogue_value(acc[i][j][half * 2 + 1], b.y, res.y, relu));
      }
    }
  }
}

template <typename T, class Cfg>
void launch(const ConvArgs& a) {
  const Problem& pr = a.problem;
  const int64_t tiles_m = ceil_div(pr.gemm_m(), Cfg::kTile.block_m);
  const int64_t tiles_n = ceil_div(pr.k, Cfg::kTile.block_n);
  if (tiles_m == 0 || tiles_n == 0) return;
  auto kernel = conv_mma_kernel<T, Cfg>;
  // Over 48 KiB of dynamic shared memory needs the opt-in; it is a function attribute, not a stream
  // operation, so it is also fine during CUDA-graph capture.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  kernel<<<static_cast<unsigned>(tiles_m * tiles_n), Cfg::kThreads, Cfg::kSmemBytes, a.stream>>>(
      pr, static_cast<const T*>(a.x), static_cast<const T*>(a.weight), static_cast<const T*>(a.bias),
      static_cast<const T*>(a.residual), static_cast<T*>(a.out), a.relu, static_cast<int32_t>(tiles_m),
      static_cast<int32_t>(tiles_n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_tile(const ConvArgs& a, const TileShape& tile) {
  using Large = Config<T, kLargeTile.block_m, kLargeTile.block_n, kLargeTile.warps_m, kLargeTile.warps_n,
                       kLargeTile.stages>;
  using Small = Config<T, kSmallTile.block_m, kSmallTile.block_n, kSmallTile.warps_m, kSmallTile.warps_n,
                       kSmallTile.stages>;
  if (tile.block_m == kLargeTile.block_m && tile.block_n == kLargeTile.block_n) return launch<T, Large>(a);
  return launch<T, Small>(a);
}

}  // namespace

void conv_mma_sm80(const ConvArgs& args, const TileShape& tile) {
  if (args.dtype == DType::kHalf) return launch_tile<__half>(args, tile);
  return launch_tile<__nv_bfloat16>(args, tile);
}

}  // namespace resnet_fused::cuda::conv
