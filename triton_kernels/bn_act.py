"""Training-mode BatchNorm (+ residual add) + ReLU, forward and backward, and add + ReLU, in Triton.

    out = act(weight * (x - mean) * invstd + bias + residual),   act = ReLU or identity

Semantics are those of the CPU kernels (csrc/cpu/bn_act.cpp, csrc/cpu/add_act.cpp): per-channel
batch statistics over N*H*W (biased variance to normalize, unbiased for the running variance),
fp32 accumulation for every input dtype, ReLU(NaN) = NaN.

Layouts
-------
Every kernel sees a 4-D tensor as tiles of a (rows x channels) view with three strides, so one
kernel body serves both memory formats the callers use:

* channels_last (NHWC, the fast path): an (M = N*H*W, C) matrix; rows have stride C, channels
  stride 1.  Also used whenever C == 1 or H*W == 1, where both formats store the same offsets.
* NCHW: N planes of an (H*W, C) view; rows (pixels) have stride 1, channels stride H*W, planes
  stride C*H*W.

A tile is BLOCK_R rows x BLOCK_C channels of one plane; the tile index ``it`` enumerates
(plane, row chunk).  Strides are runtime ints, so Triton's specialization of a stride equal to 1
(a constexpr) and of multiples of 16 tells the compiler which axis is contiguous and aligned:
16-byte vector loads along channels in NHWC (C % 16 == 0, all of ResNet) and along pixels in NCHW
(H*W % 16 == 0: 112, 56, 28 but not 14 and 7, which load element by element).  The tile shape
comes from the config list of that layout (``bn_configs``).

Kernels and launches
--------------------
Forward, training (3 launches):
  1. ``_bn_stats_kernel``: the one read pass for the statistics.  Grid (channel blocks, P): each
     program walks a contiguous range of tiles (P ranges per channel block) and keeps, per lane,
     in fp32 registers, a Welford state (mean, M2, count) of the data shifted by the channel's
     first element, and a plain sum of x.  At the end the BLOCK_R lanes of a channel are merged
     (Chan's parallel formula in closed form, ``_welford_merge_rows``: tree sums), and the
     program writes one partial (shifted mean, M2, count, sum) per channel to a workspace.  No sums
     of squares: the variance never comes from E[x^2] - E[x]^2, and the shift keeps it accurate
     when |mean| >> std (Welford on unshifted fp32 data loses about log2(|mean| / std) bits); the
     mean comes from the sum, so its error is of the order of an ulp of the mean, not of the
     shift.
  2. ``_bn_stats_finalize_kernel``: merges the P partials of each channel in a fixed order (tiles
     of BLOCK_P partials merged in closed form, then chained with ``_welford_combine``): Chan's
     formula for M2, sums for the mean; writes mean, invstd = 1/sqrt(var + eps) (correctly
     rounded sqrt and divisions), and the new running statistics ((1-m)*running + m*batch,
     unbiased variance) in the running statistics' dtype.
  3. ``_bn_apply_kernel``: the elementwise pass, one tile per program:
     out = act(x * scale + shift + residual), scale = w*invstd, shift = b - mean*scale per channel
     (the CPU kernel's formula).
Forward, eval (1 launch): ``_bn_apply_kernel`` with EVAL=True computes invstd from the running
  variance itself, and its first row of programs writes save_mean / save_invstd and the copies of
  the running statistics.
Backward, training (3 launches):
  1. ``_bn_bwd_reduce_kernel``: one read pass over grad_out, out (ReLU mask: g = grad_out where
     out > 0) and x; per-lane fp32 sums of g and g*(x - mean), reduced per program and written as
     P partials per channel.  It also writes grad_pre = g, so that
  3. ``_bn_bwd_apply_kernel`` reads g back (2 tensors: grad_pre, x) instead of grad_out and out
     (3 tensors): 7 tensor passes in all instead of 8 with the ReLU.
     grad_x = w*invstd * (g - sum_g/count - xhat * sum_gxhat/count), xhat = (x - mean)*invstd.
  2. ``_bn_bwd_finalize_kernel`` between them: sums the partials in a fixed order, writes
     grad_bias = sum_g and grad_weight = invstd * sum_g(x - mean) in the weight dtype, and the two
     fp32 per-channel coefficients the apply pass needs.
Backward, eval (2 launches): the reduce pass also writes grad_x = w*invstd*g (no statistics
  term), then the finalize writes grad_weight / grad_bias.
``_add_act_kernel``: out = act(x + residual) over the flat storage (1 launch).

Determinism: no atomics.  Every reduction runs in an order fixed by the launch configuration
(tile shape, partial count), so results are bitwise reproducible run to run on a GPU for a given
config.  The autotuner may pick a different config in another process (timing noise), which can
change the last bits; with ``torch.use_deterministic_algorithms(True)`` the launchers skip the
autotuner and use the first config of each list, so results do not depend on timing.

Index math: tile base offsets are int64 scalars always; per-lane offsets are int32 unless the
constexpr INDEX_64 is set (a tensor of 2^30 elements or more), since the config clamping keeps a
tile's lane offsets below 2 * numel.

Interpreter: under ``TRITON_INTERPRET=1`` (read at import, as Triton does) kernels run on CPU
tensors with one small fixed config per layout and no autotuner (``INTERPRET_*``).  There is no
``tl.dot`` here, so bfloat16 works in the interpreter too.

``aot.py --family bn`` compiles every config of every kernel in ``KERNELS`` for sm_80 and sm_90.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["bn_act_forward", "bn_act_backward", "add_act", "bn_configs", "kernel_configs",
           "add_configs", "FINALIZE_CONFIG", "KERNELS", "INTERPRET"]

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. at import of this module.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Per-lane offsets are int32 below this many elements (see the module docstring).
_INT32_LIMIT = 1 << 30

# Upper bound on the partials per channel of the two-level reductions (workspace rows).
MAX_PARTIALS = 1024


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileSpec:
    """A layout-independent tile recipe: ``tile`` elements, at most ``inner`` of them along the
    contiguous axis (channels in NHWC, pixels in NCHW), ``warps`` warps, and for the reduction
    kernels ``split``: the target number of programs per SM of the first reduction level
    (partials per channel = split * SMs / channel blocks, capped by the tiles and MAX_PARTIALS)
    and ``unroll``: tiles loaded per loop iteration (1 or 2)."""
    tile: int
    inner: int
    warps: int
    split: int = 0
    unroll: int = 1


# Bandwidth-bound kernels: 16-byte vector loads along the contiguous axis (8 x 16-bit or 4 x fp32
# elements per vector), 32-64 bytes per thread per tensor (tile sizes below are for 16-bit data;
# fp32 gets half the elements, see _config_from_spec), and enough programs in flight.
# H100/H200 (~3.3/4.8 TB/s, 132 SMs) and A100 (~2 TB/s, 108 SMs) differ in bandwidth and SM
# count, not in what makes these kernels fast, so one list per layout serves both; the SM count
# enters through ``split``.  Register use and spills are checked by aot.py (no spills in any
# config, both archs, all dtypes; 25-159 registers).
# TODO(gpu): these lists are educated guesses, not yet timed on the H200: prune or extend them
# after a benchmark run (bench/), and check whether ``split`` 4 or 16 ever wins.

# Statistics pass (per-lane fp32 state: 3 values per element + the loaded tile).  64 x 128 tiles
# with 8 warps took 168+ registers (1 program of 8 warps per SM): not listed; UNROLL=2 puts twice
# the bytes in flight instead, at about +10 registers (64 x 64 bf16 on sm_80: 112 -> 120).
STATS_SPECS_NHWC = [
    TileSpec(4096, 64, 8, split=4, unroll=2),   # 64 rows x 64 channels
    TileSpec(4096, 64, 8, split=4),
    TileSpec(4096, 128, 8, split=4, unroll=2),  # 32 x 128 (wide C)
    TileSpec(2048, 64, 4, split=8, unroll=2),   # 32 x 64, more programs
    TileSpec(4096, 64, 8, split=16),            # many short programs
]
# NCHW (the slow path: channels_last is what the fused blocks use) gets three configs per pass.
STATS_SPECS_NCHW = [
    TileSpec(4096, 1024, 8, split=4, unroll=2),  # 1024 pixels x 4 channels (56x56, 112x112)
    TileSpec(4096, 256, 8, split=4, unroll=2),   # 256 x 16 (28x28 planes)
    TileSpec(2048, 64, 8, split=8, unroll=2),    # 7x7 / 14x14 planes (capped, see below)
]
# Backward reduction pass: three tensors read (grad_out, out, x) and one written per tile, so
# one tile in flight already moves 3x the statistics pass's bytes; UNROLL=2 of 16 elements per
# thread took 142-216 registers: only on a half-size tile here.
BWD_SPECS_NHWC = [
    TileSpec(4096, 64, 8, split=4),             # 64 x 64
    TileSpec(4096, 128, 8, split=4),            # 32 x 128
    TileSpec(2048, 64, 4, split=8),             # 32 x 64
    TileSpec(2048, 64, 8, split=4, unroll=2),   # 32 x 64, 8 warps, two tiles in flight
    TileSpec(4096, 64, 8, split=16),
]
BWD_SPECS_NCHW = [
    TileSpec(4096, 1024, 8, split=4),
    TileSpec(4096, 256, 8, split=4),
    TileSpec(2048, 64, 4, split=8),
]
# Elementwise passes: one tile per program.
APPLY_SPECS_NHWC = [
    TileSpec(4096, 64, 4),   # 64 x 64, 32 elements per thread
    TileSpec(4096, 128, 8),  # 32 x 128
    TileSpec(8192, 64, 8),   # 128 x 64
    TileSpec(2048, 64, 4),   # 32 x 64: small problems, more programs
]
APPLY_SPECS_NCHW = [
    TileSpec(4096, 1024, 4),
    TileSpec(4096, 256, 8),
    TileSpec(2048, 64, 4),
]
# add_act: a flat elementwise pass.
ADD_SPECS = [(1024, 4), (2048, 4), (4096, 8), (8192, 8)]  # (BLOCK, warps)

# The finalize kernels read P partials x BLOCK_C channels per program, BLOCK_P at a time: a fixed
# config (a few microseconds; no autotuning).  128 x 32 fp32 with 8 warps: 16 values per thread
# per array.
FINALIZE_CONFIG = triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=8, num_stages=1)

# Under TRITON_INTERPRET=1: one config per kind and layout.  The interpreter runs programs one by
# one with numpy, so few, mid-sized programs are fastest; 4 partials (split 4 x "1 SM") and
# BLOCK_P = 2 keep both reduction levels and the finalize's chaining of partial blocks exercised
# on tiny shapes (the tests force smaller tiles too).
INTERPRET_SPECS = {  # (kind, channels_last) -> spec; both UNROLL values run in both passes
    ("stats", True): TileSpec(512, 8, 1, split=4, unroll=2),
    ("stats", False): TileSpec(512, 64, 1, split=4, unroll=1),
    ("bwd_reduce", True): TileSpec(512, 8, 1, split=4, unroll=1),
    ("bwd_reduce", False): TileSpec(512, 64, 1, split=4, unroll=2),
    ("apply", True): TileSpec(1024, 16, 1),
    ("apply", False): TileSpec(1024, 64, 1),
}
INTERPRET_FINALIZE_CONFIG = triton.Config({"BLOCK_P": 2, "BLOCK_C": 4}, num_warps=1, num_stages=1)
INTERPRET_ADD_BLOCK = 256

# Autotune keys: the view's geometry (stride_c tells NHWC from NCHW) and the kernel variant; the
# autotuner adds the tensor dtypes.
REDUCE_KEY = ["N_OUTER", "R", "C", "stride_c", "RELU", "EVAL"]
STATS_KEY = ["N_OUTER", "R", "C", "stride_c"]
APPLY_KEY = ["N_OUTER", "R", "C", "stride_c", "HAS_RES", "RELU", "EVAL"]
ADD_KEY = ["numel"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _config_from_spec(spec: TileSpec, channels_last: bool, rows: int, channels: int,
                      reduce: bool, elem_size: int = 2) -> triton.Config:
    """The spec clamped to the problem and the dtype.  ``spec.tile`` is for 16-bit data; 4-byte
    data gets half the elements (the same bytes per thread: fp32 tiles of the 16-bit size took
    150-190 registers in the reduction kernels).  When the contiguous axis is not known to be
    16-element aligned (NHWC with C % 16 != 0, NCHW with H*W % 16 != 0: the 7x7 and 14x14 planes)
    Triton cannot vectorize, every element carries its own 64-bit address, and the tile is capped
    at 8 elements per thread (a 64 x 64 NCHW 7x7 tile took 168-255 registers and spilled).  The
    contiguous axis then gets at most ``inner`` (and no more than the problem's extent, rounded up
    to a power of 2), the other axis the rest of the tile, also clamped; warps shrink so that every
    thread keeps >= 8 elements."""
    tile = max(1, spec.tile * 2 // elem_size)
    aligned = (channels if channels_last else rows) % 16 == 0
    if not aligned:
        tile = min(tile, spec.warps * 32 * 8)
    rows_p2, chans_p2 = _next_pow2(max(rows, 1)), _next_pow2(max(channels, 1))
    if channels_last:
        block_c = min(spec.inner, chans_p2)
        block_r = max(1, min(rows_p2, tile // block_c))
    else:
        block_r = min(spec.inner, rows_p2)
        block_c = max(1, min(chans_p2, tile // block_r))
    warps = max(1, min(spec.warps, block_r * block_c // 256))
    kwargs = {"BLOCK_R": block_r, "BLOCK_C": block_c}
    if reduce:
        kwargs["SPLIT"] = spec.split
        kwargs["UNROLL"] = spec.unroll
    return triton.Config(kwargs, num_warps=warps, num_stages=1)


def bn_configs(kind: str, channels_last: bool, rows: int, channels: int,
               elem_size: int = 2) -> list[triton.Config]:
    """The configs the autotuner tries for one problem: ``kind`` is "stats" (the forward
    statistics pass), "bwd_reduce" (the backward reduction pass) or "apply" (the elementwise
    passes, forward and backward); ``rows`` is the view's R (M in NHWC, H*W in NCHW);
    ``elem_size`` the activations' bytes per element.  Clamped to the problem and deduplicated;
    aot.py compiles exactly these."""
    return list(_bn_configs(kind, bool(channels_last), int(rows), int(channels), int(elem_size)))


@functools.lru_cache(maxsize=4096)
def _bn_configs(kind, channels_last, rows, channels, elem_size):
    if INTERPRET:
        specs = [INTERPRET_SPECS[(kind, bool(channels_last))]]
    elif kind == "stats":
        specs = STATS_SPECS_NHWC if channels_last else STATS_SPECS_NCHW
    elif kind == "bwd_reduce":
        specs = BWD_SPECS_NHWC if channels_last else BWD_SPECS_NCHW
    else:
        specs = APPLY_SPECS_NHWC if channels_last else APPLY_SPECS_NCHW
    out, seen = [], set()
    for spec in specs:
        c = _config_from_spec(spec, channels_last, rows, channels, kind != "apply", elem_size)
        key = (tuple(sorted(c.kwargs.items())), c.num_warps)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return tuple(out)


def add_configs(numel: int) -> list[triton.Config]:
    """add_act's configs, BLOCK clamped to the problem."""
    if INTERPRET:
        return [triton.Config({"BLOCK": INTERPRET_ADD_BLOCK}, num_warps=1, num_stages=1)]
    cap = _next_pow2(max(numel, 1))
    out, seen = [], set()
    for block, warps in ADD_SPECS:
        block = min(block, max(cap, 256))
        warps = max(1, min(warps, block // 256))
        if (block, warps) not in seen:
            seen.add((block, warps))
            out.append(triton.Config({"BLOCK": block}, num_warps=warps, num_stages=1))
    return out


def kernel_configs(name: str, ints: dict, constexprs: dict, elem_size: int) -> list[triton.Config]:
    """Every config the launcher or the autotuner may use for kernel ``name`` (a key of KERNELS)
    on the problem given by its runtime ints and constexprs, for activations of ``elem_size``
    bytes (aot.py's entry point)."""
    if name in ("bn_stats_finalize", "bn_bwd_finalize"):
        return [FINALIZE_CONFIG]
    if name == "add_act":
        return add_configs(ints["numel"])
    kind = {"bn_stats": "stats", "bn_bwd_reduce": "bwd_reduce"}.get(name, "apply")
    return bn_configs(kind, bool(constexprs["CL"]), ints["R"], ints["C"], elem_size)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan's parallel merge of two (mean, M2, count) states; an empty state (count 0) is the
    identity.  Counts are whole numbers, so max(n, 1) only guards the empty + empty case."""
    n = n_a + n_b
    delta = mean_b - mean_a
    w_b = n_b / tl.maximum(n, 1.0)
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _welford_merge_rows(mean, m2, n):
    """Per column, the merge of the rows' Welford states: Chan's formula in closed form, a
    two-pass over the row means (n = sum n_i, mean = sum n_i mean_i / n,
    M2 = sum M2_i + n_i (mean_i - mean)^2), with built-in sums only.  Rows with n_i = 0 add
    nothing; ``n`` may also be one column (equal counts across columns), then the count
    returned has shape (1,).  (A tl.reduce with _welford_combine computes the same with a
    division per tree step, and the interpreter runs such a reduce element by element in Python:
    30x slower.)"""
    n_all = tl.sum(n, 0)
    mean_all = tl.sum(n * mean, 0) / tl.maximum(n_all, 1.0)
    d = mean - mean_all[None, :]
    return mean_all, tl.sum(m2 + n * d * d, 0), n_all


@triton.jit
def _lane_offsets(offs_r, offs_c, stride_r, stride_c, INDEX_64: tl.constexpr):
    """Offsets of the tile's elements from the tile base; the same for every tile."""
    if INDEX_64:
        lane = offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
    else:
        lane = offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    return lane


@triton.jit
def _channel_offsets(offs_c, stride_c, INDEX_64: tl.constexpr):
    """Offsets of the channels' first elements (plane 0, row 0)."""
    if INDEX_64:
        off = offs_c.to(tl.int64) * stride_c
    else:
        off = offs_c * stride_c
    return off


@triton.jit
def _tile_base(it, chunks, R, stride_o, stride_r, BLOCK_R: tl.constexpr):
    """Tile ``it`` of the view: plane it // chunks, rows from (it % chunks) * BLOCK_R.  Returns the
    element offset of its first row (int64) and its number of valid rows (int32, <= BLOCK_R)."""
    o = it // chunks
    r0 = (it - o * chunks) * BLOCK_R
    base = o.to(tl.int64) * stride_o + r0.to(tl.int64) * stride_r
    rows = tl.minimum(R - r0, BLOCK_R).to(tl.int32)
    return base, rows


@triton.jit
def _elementwise_program(C, INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr):
    """An elementwise program's work: its tile index (int64 when INDEX_64), its channels and their mask.
    The grid is tiles x channel blocks, channel blocks fastest."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    it = pid // c_blocks
    pid_c = pid - it * c_blocks
    if INDEX_64:
        it = it.to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return it, offs_c, offs_c < C


@triton.jit
def _item_range(pid_p, num_p, N_OUTER, R, BLOCK_R: tl.constexpr):
    """The tiles [start, end) of partial pid_p of num_p, in int64, balanced to within one tile."""
    chunks = tl.cdiv(R, BLOCK_R)
    # "0 * pid +": an int64 tensor even when R and N_OUTER were specialized to constexpr 1.
    n_items = pid_p.to(tl.int64) * 0 + chunks * N_OUTER
    start = pid_p.to(tl.int64) * n_items // num_p
    end = (pid_p.to(tl.int64) + 1) * n_items // num_p
    return chunks, start, end


@triton.jit
def _tile_mask(it, end, chunks, R, stride_o, stride_r, offs_r, c_ok, BLOCK_R: tl.constexpr):
    """Tile ``it`` of a program's range [.., end): base offset, row mask, element mask (all
    false for it >= end, the odd tile of an unrolled pair)."""
    base, rows = _tile_base(it, chunks, R, stride_o, stride_r, BLOCK_R)
    rows = tl.where(it < end, rows, 0)
    r_ok = offs_r < rows
    return base, r_ok, r_ok[:, None] & c_ok[None, :]


@triton.jit
def _welford_step(x, r_ok, shift, mean, m2, total, cnt):
    """One tile into the per-lane state (rows with r_ok false are left unchanged)."""
    x = x.to(tl.float32)
    total += x  # masked lanes load 0
    x -= shift[None, :]
    cnt += r_ok.to(tl.float32)
    inv = tl.where(r_ok, 1.0 / tl.maximum(cnt, 1.0), 0.0)  # one reciprocal per row
    delta = x - mean
    mean += delta * inv[:, None]
    m2 = tl.where(r_ok[:, None], m2 + delta * (x - mean), m2)
    return mean, m2, total, cnt


@triton.jit
def _bwd_load(go_ptr, y_ptr, x_ptr, off, mask, RELU: tl.constexpr):
    """g (grad_out masked by ReLU: it passes where out > 0, not where out is NaN) and x, fp32."""
    g = tl.load(go_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(y > 0.0, g, 0.0)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return g, x


@triton.jit
def _bwd_step(g, x, off, mask, mean, k, acc_g, acc_gx, gpre_ptr, gx_ptr, EVAL: tl.constexpr):
    """One tile into the sums (masked lanes hold g = 0); writes grad_pre (and grad_x in eval)."""
    acc_g += g
    acc_gx += g * (x - mean[None, :])
    tl.store(gpre_ptr + off, g.to(gpre_ptr.dtype.element_ty), mask=mask)
    if EVAL:
        tl.store(gx_ptr + off, (k[None, :] * g).to(gx_ptr.dtype.element_ty), mask=mask)
    return acc_g, acc_gx


@triton.jit
def _bn_stats_kernel(
    x_ptr, ws_ptr,
    N_OUTER, R, C, stride_o, stride_r, stride_c, P_STRIDE,
    CL: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, UNROLL: tl.constexpr,
):
    """First level of the statistics: per channel of one tile range, the Welford state
    (mean - shift, M2, count) with shift = the channel's first element, and the sum of x.
    Workspace: ws[k * P_STRIDE + p * C + c] for k = 0 (shifted mean), 1 (M2), 2 (count), 3 (sum);
    the number of partials at ws[4 * P_STRIDE].  CL and SPLIT only steer the launcher (configs,
    grid)."""
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    chunks, start, end = _item_range(pid_p, num_p, N_OUTER, R, BLOCK_R)

    offs_r = tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    lane = _lane_offsets(offs_r, offs_c, stride_r, stride_c, INDEX_64)

    # The variance comes from Welford states of shifted data: every program of a channel
    # subtracts the channel's first element, so the running means stay of the order of the
    # standard deviation and M2 keeps its accuracy when |mean| >> std.  The mean comes from plain
    # fp32 sums of x (error of the order of an ulp of the mean, not of the shift).
    shift = tl.load(x_ptr + _channel_offsets(offs_c, stride_c, INDEX_64), mask=c_ok, other=0.0)
    shift = shift.to(tl.float32)

    # Per-lane state; the count only depends on the row (channel tails are discarded).
    mean = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    # UNROLL = 2: both tiles' loads are issued before either is used (Triton does not pipeline
    # loads that feed no tl.dot), doubling the bytes in flight per thread.
    for it in range(start, end, UNROLL):
        base, r_ok, mask = _tile_mask(it, end, chunks, R, stride_o, stride_r, offs_r, c_ok, BLOCK_R)
        x = tl.load(x_ptr + base + lane, mask=mask, other=0.0)
        if UNROLL == 2:
            base_b, r_ok_b, mask_b = _tile_mask(it + 1, end, chunks, R, stride_o, stride_r, offs_r,
                                                c_ok, BLOCK_R)
            x_b = tl.load(x_ptr + base_b + lane, mask=mask_b, other=0.0)
        mean, m2, total, cnt = _welford_step(x, r_ok, shift, mean, m2, total, cnt)
        if UNROLL == 2:
            mean, m2, total, cnt = _welford_step(x_b, r_ok_b, shift, mean, m2, total, cnt)

    p_mean, p_m2, p_cnt = _welford_merge_rows(mean, m2, cnt[:, None])  # counts: one per row
    p_cnt = tl.broadcast_to(p_cnt, (BLOCK_C,))
    off = pid_p.to(tl.int64) * C + offs_c
    tl.store(ws_ptr + off, p_mean, mask=c_ok)
    tl.store(ws_ptr + P_STRIDE + off, p_m2, mask=c_ok)
    tl.store(ws_ptr + 2 * P_STRIDE + off, p_cnt, mask=c_ok)
    tl.store(ws_ptr + 3 * P_STRIDE + off, tl.sum(total, 0), mask=c_ok)
    if (pid_c == 0) & (pid_p == 0):
        tl.store(ws_ptr + 4 * P_STRIDE, num_p.to(tl.float32))


@triton.jit
def _bn_stats_finalize_kernel(
    ws_ptr, rm_ptr, rv_ptr, mean_ptr, invstd_ptr, new_rm_ptr, new_rv_ptr,
    C, P_STRIDE, count, momentum, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Second level: merges the partials of BLOCK_C channels in a fixed order (Chan's formula for
    M2, a sum for the mean), then writes mean, invstd and the running statistics (``count`` > 1
    values per channel)."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    num_p = tl.load(ws_ptr + 4 * P_STRIDE).to(tl.int32)
    offs_p = tl.arange(0, BLOCK_P)

    shifted_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, num_p, BLOCK_P):
        p = p0 + offs_p
        ok = (p < num_p)[:, None] & c_ok[None, :]
        off = p.to(tl.int64)[:, None] * C + offs_c[None, :]
        b_mean = tl.load(ws_ptr + off, mask=ok, other=0.0)
        b_m2 = tl.load(ws_ptr + P_STRIDE + off, mask=ok, other=0.0)
        b_n = tl.load(ws_ptr + 2 * P_STRIDE + off, mask=ok, other=0.0)
        t_mean, t_m2, t_n = _welford_merge_rows(b_mean, b_m2, b_n)
        shifted_mean, m2, n = _welford_combine(shifted_mean, m2, n, t_mean, t_m2, t_n)
        total += tl.sum(tl.load(ws_ptr + 3 * P_STRIDE + off, mask=ok, other=0.0), 0)

    # Correctly rounded sqrt and divisions (Triton's "/" on fp32 is the approximate div.full).
    mean = tl.math.div_rn(total, count + tl.zeros_like(total))
    var = tl.math.div_rn(m2, count + tl.zeros_like(m2))
    invstd = tl.math.div_rn(tl.full((BLOCK_C,), 1.0, tl.float32), tl.sqrt_rn(var + eps))
    unbiased = tl.math.div_rn(m2, (count - 1.0) + tl.zeros_like(m2))
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(invstd_ptr + offs_c, invstd, mask=c_ok)
    rm = tl.load(rm_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    new_rm = (1.0 - momentum) * rm + momentum * mean
    new_rv = (1.0 - momentum) * rv + momentum * unbiased
    tl.store(new_rm_ptr + offs_c, new_rm.to(new_rm_ptr.dtype.element_ty), mask=c_ok)
    tl.store(new_rv_ptr + offs_c, new_rv.to(new_rv_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _bn_apply_kernel(
    x_ptr, r_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr,
    save_mean_ptr, save_invstd_ptr, new_rm_ptr, new_rv_ptr,
    N_OUTER, R, C, stride_o, stride_r, stride_c, eps,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, EVAL: tl.constexpr,
    CL: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = act(x * scale + shift + residual) on one tile.  Training: mean_ptr / var_ptr are the
    batch mean and invstd (fp32).  EVAL: they are the running mean and variance; invstd is computed
    here, and the programs of the first row tile write save_mean, save_invstd and copies of the
    running statistics (the eval forward is this one launch)."""
    it, offs_c, c_ok = _elementwise_program(C, INDEX_64, BLOCK_C)
    w = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    mean_raw = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    mean = mean_raw.to(tl.float32)
    if EVAL:
        var_raw = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0)
        invstd = tl.math.div_rn(tl.full((BLOCK_C,), 1.0, tl.float32),
                                tl.sqrt_rn(var_raw.to(tl.float32) + eps))
        if it == 0:
            tl.store(save_mean_ptr + offs_c, mean, mask=c_ok)
            tl.store(save_invstd_ptr + offs_c, invstd, mask=c_ok)
            tl.store(new_rm_ptr + offs_c, mean_raw, mask=c_ok)  # bit-exact copies
            tl.store(new_rv_ptr + offs_c, var_raw, mask=c_ok)
    else:
        invstd = tl.load(var_ptr + offs_c, mask=c_ok, other=0.0)
    scale = w * invstd
    shift = b - mean * scale

    offs_r = tl.arange(0, BLOCK_R)
    base, rows = _tile_base(it, tl.cdiv(R, BLOCK_R), R, stride_o, stride_r, BLOCK_R)
    off = base + _lane_offsets(offs_r, offs_c, stride_r, stride_c, INDEX_64)
    mask = (offs_r < rows)[:, None] & c_ok[None, :]
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RES:
        v += tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        # propagate_nan: ReLU(NaN) = NaN, as torch.relu (plain max.f32 would return 0).
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + off, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(
    go_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, gpre_ptr, gx_ptr, ws_ptr,
    N_OUTER, R, C, stride_o, stride_r, stride_c, P_STRIDE,
    RELU: tl.constexpr, EVAL: tl.constexpr, CL: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, UNROLL: tl.constexpr,
):
    """First level of the backward sums, and grad_pre = g (ReLU-masked grad_out) on the way.
    Partials: ws[2C + k * P_STRIDE + p * C + c], k = 0: sum g, 1: sum g * (x - mean); the number
    of partials at ws[2C + 2 * P_STRIDE].  EVAL also writes grad_x = w * invstd * g (eval has no
    statistics term, so the backward needs no second pass)."""
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_p = tl.num_programs(1)
    chunks, start, end = _item_range(pid_p, num_p, N_OUTER, R, BLOCK_R)

    offs_r = tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    lane = _lane_offsets(offs_r, offs_c, stride_r, stride_c, INDEX_64)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if EVAL:
        k = (tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
             * tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32))
    else:
        k = mean  # unused

    acc_g = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    # UNROLL = 2: both tiles' loads before either tile's stores (the compiler cannot move loads
    # above stores to other pointers), doubling the bytes in flight per thread.
    for it in range(start, end, UNROLL):
        base, r_ok, mask = _tile_mask(it, end, chunks, R, stride_o, stride_r, offs_r, c_ok, BLOCK_R)
        g, x = _bwd_load(go_ptr, y_ptr, x_ptr, base + lane, mask, RELU)
        if UNROLL == 2:
            base_b, r_ok_b, mask_b = _tile_mask(it + 1, end, chunks, R, stride_o, stride_r, offs_r,
                                                c_ok, BLOCK_R)
            g_b, x_b = _bwd_load(go_ptr, y_ptr, x_ptr, base_b + lane, mask_b, RELU)
        acc_g, acc_gx = _bwd_step(g, x, base + lane, mask, mean, k, acc_g, acc_gx, gpre_ptr,
                                  gx_ptr, EVAL)
        if UNROLL == 2:
            acc_g, acc_gx = _bwd_step(g_b, x_b, base_b + lane, mask_b, mean, k, acc_g, acc_gx,
                                      gpre_ptr, gx_ptr, EVAL)

    off = 2 * C + pid_p.to(tl.int64) * C + offs_c
    tl.store(ws_ptr + off, tl.sum(acc_g, 0), mask=c_ok)
    tl.store(ws_ptr + P_STRIDE + off, tl.sum(acc_gx, 0), mask=c_ok)
    if (pid_c == 0) & (pid_p == 0):
        tl.store(ws_ptr + 2 * C + 2 * P_STRIDE, num_p.to(tl.float32))


@triton.jit
def _bn_bwd_finalize_kernel(
    ws_ptr, invstd_ptr, gw_ptr, gb_ptr,
    C, P_STRIDE, count,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Second level of the backward sums (fixed order): grad_bias = sum g, grad_weight =
    invstd * sum g (x - mean) in the weight dtype, and the fp32 coefficients of the training apply
    pass, ws[c] = sum_g / count and ws[C + c] = grad_weight / count."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    num_p = tl.load(ws_ptr + 2 * C + 2 * P_STRIDE).to(tl.int32)
    offs_p = tl.arange(0, BLOCK_P)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, num_p, BLOCK_P):
        p = p0 + offs_p
        ok = (p < num_p)[:, None] & c_ok[None, :]
        off = 2 * C + p.to(tl.int64)[:, None] * C + offs_c[None, :]
        sum_g += tl.sum(tl.load(ws_ptr + off, mask=ok, other=0.0), 0)
        sum_gx += tl.sum(tl.load(ws_ptr + P_STRIDE + off, mask=ok, other=0.0), 0)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    grad_w = sum_gx * invstd
    tl.store(gw_ptr + offs_c, grad_w.to(gw_ptr.dtype.element_ty), mask=c_ok)
    tl.store(gb_ptr + offs_c, sum_g.to(gb_ptr.dtype.element_ty), mask=c_ok)
    cnt = count + tl.zeros_like(sum_g)
    tl.store(ws_ptr + offs_c, tl.math.div_rn(sum_g, cnt), mask=c_ok)
    tl.store(ws_ptr + C + offs_c, tl.math.div_rn(grad_w, cnt), mask=c_ok)


@triton.jit
def _bn_bwd_apply_kernel(
    gpre_ptr, x_ptr, gx_ptr, mean_ptr, invstd_ptr, w_ptr, ws_ptr,
    N_OUTER, R, C, stride_o, stride_r, stride_c,
    CL: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x = w * invstd * (g - mean_g - xhat * mean_gxhat) on one tile (training), reading g
    from grad_pre (written by the reduce pass) and the coefficients from ws[0:2C]."""
    it, offs_c, c_ok = _elementwise_program(C, INDEX_64, BLOCK_C)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    k = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32) * invstd
    mean_g = tl.load(ws_ptr + offs_c, mask=c_ok, other=0.0)
    mean_gxhat = tl.load(ws_ptr + C + offs_c, mask=c_ok, other=0.0)

    offs_r = tl.arange(0, BLOCK_R)
    base, rows = _tile_base(it, tl.cdiv(R, BLOCK_R), R, stride_o, stride_r, BLOCK_R)
    off = base + _lane_offsets(offs_r, offs_c, stride_r, stride_c, INDEX_64)
    mask = (offs_r < rows)[:, None] & c_ok[None, :]
    g = tl.load(gpre_ptr + off, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * invstd[None, :]
    gx = k[None, :] * (g - mean_g[None, :] - xhat * mean_gxhat[None, :])
    tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_act_kernel(x_ptr, r_ptr, y_ptr, numel, RELU: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(x + r) over BLOCK elements of the flat storage; int64 block base."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.minimum(numel - base, BLOCK).to(tl.int32)
    v = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
         + tl.load(r_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + base + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


# name -> raw @triton.jit kernel.  aot.py compiles, per representative problem, the configs
# ``kernel_configs`` returns (the ones the autotuner / launcher would use).
KERNELS = {
    "bn_stats": _bn_stats_kernel,
    "bn_stats_finalize": _bn_stats_finalize_kernel,
    "bn_apply": _bn_apply_kernel,
    "bn_bwd_reduce": _bn_bwd_reduce_kernel,
    "bn_bwd_finalize": _bn_bwd_finalize_kernel,
    "bn_bwd_apply": _bn_bwd_apply_kernel,
    "add_act": _add_act_kernel,
}


def _prune_bn(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return bn_configs(kind, bool(args["CL"]), int(args["R"]), int(args["C"]),
                          args["x_ptr"].element_size())
    return prune


def _prune_add(configs, named_args, **kwargs):
    return add_configs(int({**named_args, **kwargs}["numel"]))


# Declared lists only need > 1 entry (the prune hooks generate the real, clamped ones).
_DECLARED_STATS = [_config_from_spec(s, True, 1 << 20, 2048, True) for s in STATS_SPECS_NHWC]
_DECLARED_BWD = [_config_from_spec(s, True, 1 << 20, 2048, True) for s in BWD_SPECS_NHWC]
_DECLARED_APPLY = [_config_from_spec(s, True, 1 << 20, 2048, False) for s in APPLY_SPECS_NHWC]

if INTERPRET:
    _stats_tuned = _bn_bwd_reduce_tuned = _apply_tuned = _bwd_apply_tuned = _add_tuned = None
else:
    def _tune(fn, configs, key, prune):
        return triton.autotune(configs=configs, key=key,
                               prune_configs_by={"early_config_prune": prune})(fn)

    _stats_tuned = _tune(_bn_stats_kernel, _DECLARED_STATS, STATS_KEY, _prune_bn("stats"))
    _bn_bwd_reduce_tuned = _tune(_bn_bwd_reduce_kernel, _DECLARED_BWD, REDUCE_KEY,
                                 _prune_bn("bwd_reduce"))
    _apply_tuned = _tune(_bn_apply_kernel, _DECLARED_APPLY, APPLY_KEY, _prune_bn("apply"))
    _bwd_apply_tuned = _tune(_bn_bwd_apply_kernel, _DECLARED_APPLY, STATS_KEY, _prune_bn("apply"))
    _add_tuned = _tune(_add_act_kernel, add_configs(1 << 24), ADD_KEY, _prune_add)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _View:
    """A 4-D tensor as N_OUTER planes x R rows x C channels (see the module docstring)."""
    channels_last: bool
    n_outer: int
    rows: int
    channels: int
    stride_o: int
    stride_r: int
    stride_c: int
    index_64: bool

    @property
    def count(self) -> int:
        return self.n_outer * self.rows

    def args(self):
        return (self.n_outer, self.rows, self.channels, self.stride_o, self.stride_r, self.stride_c)


def _same_offsets(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """t maps every index to ref's element offset (equal strides wherever the size is > 1)."""
    return t.shape == ref.shape and all(
        a == b for size, a, b in zip(ref.shape, t.stride(), ref.stride()) if size > 1)


def _channel_view(x: torch.Tensor, *others, names=()) -> _View:
    """The view of x, after checking that x is NCHW- or channels_last-contiguous and that every
    other tensor has x's element offsets (the caller's one-memory-format guarantee)."""
    if x.dim() != 4:
        raise ValueError(f"bn_act (Triton): x must be 4-D (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    s = h * w
    nchw = x.is_contiguous()
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    if not (nchw or nhwc):
        raise ValueError("bn_act (Triton): x must be NCHW- or channels_last-contiguous, got "
                         f"strides {x.stride()} for shape {tuple(x.shape)}")
    for t, name in zip(others, names):
        if t is not None and not _same_offsets(t, x):
            raise ValueError(f"bn_act (Triton): {name} must have x's shape and memory format "
                             f"(shape {tuple(x.shape)}, strides {x.stride()}), got shape "
                             f"{tuple(t.shape)}, strides {t.stride()}")
    index_64 = x.numel() >= _INT32_LIMIT
    if c == 1 or s == 1 or not nchw or x.numel() == 0:
        # An (M, C) matrix: channels_last, or C == 1 / H*W == 1 where both formats coincide.
        return _View(True, 1, n * s, c, 0, c, 1, index_64)
    return _View(False, n, s, c, c * s, 1, s, index_64)


def _check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op} (Triton) supports float32, float16 and bfloat16, got {x.dtype}; "
                        "route float64 to the reference or CPU implementation")
    if not (INTERPRET or x.is_cuda):
        raise ValueError(f"{op} (Triton) needs CUDA tensors (CPU tensors only under "
                         "TRITON_INTERPRET=1)")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_partials(view: _View, meta: dict, sms: int, forced: int | None) -> int:
    """P, the first-level programs per channel block of a reduction: ``SPLIT`` programs per SM in
    all, at most one per tile and MAX_PARTIALS (``forced`` overrides it, for tests)."""
    if forced is not None:
        return forced
    n_items = view.n_outer * triton.cdiv(view.rows, meta["BLOCK_R"])
    c_blocks = triton.cdiv(view.channels, meta["BLOCK_C"])
    return max(1, min(n_items, triton.cdiv(meta["SPLIT"] * sms, c_blocks), MAX_PARTIALS))


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _device_ctx(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _as_config(config):
    """(constexpr kwargs, launch options) of a triton.Config or a plain dict of constexprs."""
    if isinstance(config, triton.Config):
        return dict(config.kwargs), dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return dict(config), {}


def _launch_reduce(tuned, raw, view: _View, args, constexprs, config, sms, partials):
    """A reduction kernel (statistics or backward sums) on grid (channel blocks, P): the tuned one,
    or ``config`` (interpreter, deterministic mode, tests)."""
    def grid(meta):
        return (triton.cdiv(view.channels, meta["BLOCK_C"]),
                _num_partials(view, meta, sms, partials))

    if config is None:
        tuned[grid](*args, **constexprs)
    else:
        kw, opts = _as_config(config)
        raw[grid(kw)](*args, **constexprs, **kw, **opts)


def _launch_apply(tuned, raw, view: _View, args, constexprs, config):
    """An elementwise kernel, one program per (row tile, channel block), flattened on axis 0."""
    def grid(meta):
        return (view.n_outer * triton.cdiv(view.rows, meta["BLOCK_R"])
                * triton.cdiv(view.channels, meta["BLOCK_C"]),)

    if config is None:
        tuned[grid](*args, **constexprs)
    else:
        kw, opts = _as_config(config)
        raw[grid(kw)](*args, **constexprs, **kw, **opts)


def _plan(kind: str, view: _View, x: torch.Tensor, configs: dict | None, partials: int | None):
    """(reduce config or None, apply config or None, finalize config, SM count, workspace rows
    P_cap) of a pass whose reduction is of ``kind`` ("stats" or "bwd_reduce"): None means
    "autotune"; the interpreter and deterministic mode use the first config."""
    configs = dict(configs or {})
    fixed = INTERPRET or _deterministic()
    size = x.element_size()
    reduce_cands = bn_configs(kind, view.channels_last, view.rows, view.channels, size)
    apply_cands = bn_configs("apply", view.channels_last, view.rows, view.channels, size)
    reduce_cfg = configs.get("reduce", reduce_cands[0] if fixed else None)
    apply_cfg = configs.get("apply", apply_cands[0] if fixed else None)
    finalize_cfg = configs.get("finalize",
                               INTERPRET_FINALIZE_CONFIG if INTERPRET else FINALIZE_CONFIG)
    sms = 1 if INTERPRET or not x.is_cuda else _sm_count(x.device.index)
    # Workspace rows: enough for any config that may run.
    cands = reduce_cands if reduce_cfg is None else [reduce_cfg]
    p_cap = max(_num_partials(view, _as_config(c)[0], sms, partials) for c in cands)
    return reduce_cfg, apply_cfg, finalize_cfg, sms, p_cap


def bn_act_forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                   relu, out):
    """Writes out = act(batch_norm(x) + residual) into `out` and returns
    (save_mean, save_invstd, new_running_mean, new_running_var).

    x (N, C, H, W) float32 / float16 / bfloat16 (float64 raises TypeError); weight, bias,
    running_mean, running_var (C,) in one dtype (x's, or float32 for a 16-bit x); residual None or
    x's shape; x, residual and out contiguous in one memory format (NCHW or channels_last).
    save_mean / save_invstd are float32; the new running statistics are new tensors in the running
    statistics' dtype (the inputs are never modified).  Training with one value per channel raises
    ValueError; an empty batch in training leaves the running statistics unchanged and returns
    zeros for save_mean / save_invstd.
    """
    return _forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                    relu, out)


def _forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu,
             out, configs=None, partials=None, index_64=None):
    """``bn_act_forward`` with test hooks: ``configs`` maps "reduce" / "apply" / "finalize" to a
    triton.Config (or a dict of constexprs) that bypasses the autotuner; ``partials`` forces the
    number of first-level partials per channel; ``index_64`` forces the lane offsets' width."""
    _check_dtype(x, "bn_act")
    view = _channel_view(x, residual, out, names=("residual", "out"))
    if index_64 is not None:
        view = dataclasses.replace(view, index_64=bool(index_64))
    c = view.channels
    assert tuple(out.shape) == tuple(x.shape) and out.dtype == x.dtype, "out: wrong shape or dtype"
    assert residual is None or residual.dtype == x.dtype, "residual: wrong dtype"
    for t in (weight, bias, running_mean, running_var):
        assert t.shape == (c,), "BN parameters and running statistics must have shape (C,)"
    f32 = dict(dtype=torch.float32, device=x.device)
    count = view.count
    if training and count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")
    if count == 0:
        # Nothing to normalize; statistics as the CPU kernel returns them.
        if training:
            return (torch.zeros(c, **f32), torch.zeros(c, **f32), running_mean.clone(),
                    running_var.clone())
        return (running_mean.to(torch.float32, copy=True),
                torch.reciprocal(torch.sqrt(running_var.float() + eps)),
                running_mean.clone(), running_var.clone())

    weight, bias = weight.contiguous(), bias.contiguous()
    running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    save_mean = torch.empty(c, **f32)
    save_invstd = torch.empty(c, **f32)
    new_rm = torch.empty_like(running_mean)
    new_rv = torch.empty_like(running_var)
    reduce_cfg, apply_cfg, fin_cfg, sms, p_cap = _plan("stats", view, x, configs, partials)
    common = dict(CL=view.channels_last, INDEX_64=view.index_64)
    has_res = residual is not None
    r_arg = residual if has_res else x  # never read without HAS_RES

    with _device_ctx(x):
        if training:
            p_stride = p_cap * c
            ws = torch.empty(4 * p_stride + 1, **f32)
            _launch_reduce(_stats_tuned, _bn_stats_kernel, view,
                           (x, ws, *view.args(), p_stride), common, reduce_cfg, sms, partials)
            fin_kw, fin_opts = _as_config(fin_cfg)
            _bn_stats_finalize_kernel[(triton.cdiv(c, fin_kw["BLOCK_C"]),)](
                ws, running_mean, running_var, save_mean, save_invstd, new_rm, new_rv,
                c, p_stride, float(count), float(momentum), float(eps), **fin_kw, **fin_opts)
            stats = (save_mean, save_invstd)
        else:
            stats = (running_mean, running_var)
        _launch_apply(
            _apply_tuned, _bn_apply_kernel, view,
            (x, r_arg, out, weight, bias, *stats, save_mean, save_invstd, new_rm, new_rv,
             *view.args(), float(eps)),
            dict(HAS_RES=has_res, RELU=bool(relu), EVAL=not training, **common), apply_cfg)
    return save_mean, save_invstd, new_rm, new_rv


def bn_act_backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu, grad_x,
                    grad_pre):
    """Writes grad_x and grad_pre (the gradient at the pre-activation, which is also the residual's
    gradient) into the given tensors and returns (grad_weight, grad_bias).

    g = grad_out where out > 0 (relu) else grad_out; grad_bias = sum g, grad_weight =
    sum g * xhat (xhat = (x - save_mean) * save_invstd), in weight's dtype; grad_x =
    w * invstd * (g - mean(g) - xhat * mean(g * xhat)) in training, w * invstd * g in eval;
    grad_pre = g.  grad_out, out, x, grad_x and grad_pre share x's dtype, shape and memory format.
    """
    return _backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu, grad_x,
                     grad_pre)


def _backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu, grad_x, grad_pre,
              configs=None, partials=None, index_64=None):
    """``bn_act_backward`` with the test hooks of ``_forward``."""
    _check_dtype(x, "bn_act_backward")
    view = _channel_view(x, grad_out, out if relu else None, grad_x, grad_pre,
                         names=("grad_out", "out", "grad_x", "grad_pre"))
    if index_64 is not None:
        view = dataclasses.replace(view, index_64=bool(index_64))
    c = view.channels
    for t, name in ((grad_out, "grad_out"), (out, "out"), (grad_x, "grad_x"),
                    (grad_pre, "grad_pre")):
        assert t.dtype == x.dtype, f"{name}: dtype {t.dtype} differs from x's {x.dtype}"
    count = view.count
    if count == 0:
        zeros = torch.zeros(c, dtype=weight.dtype, device=x.device)
        return zeros, zeros.clone()

    weight = weight.contiguous()
    save_mean = save_mean.to(torch.float32).contiguous()
    save_invstd = save_invstd.to(torch.float32).contiguous()
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty_like(weight)
    reduce_cfg, apply_cfg, fin_cfg, sms, p_cap = _plan("bwd_reduce", view, x, configs, partials)
    common = dict(CL=view.channels_last, INDEX_64=view.index_64)
    p_stride = p_cap * c
    ws = torch.empty(2 * c + 2 * p_stride + 1, dtype=torch.float32, device=x.device)

    with _device_ctx(x):
        _launch_reduce(
            _bn_bwd_reduce_tuned, _bn_bwd_reduce_kernel, view,
            (grad_out, out if relu else grad_out, x, save_mean, save_invstd, weight, grad_pre,
             grad_x, ws, *view.args(), p_stride),
            dict(RELU=bool(relu), EVAL=not training, **common), reduce_cfg, sms, partials)
        fin_kw, fin_opts = _as_config(fin_cfg)
        _bn_bwd_finalize_kernel[(triton.cdiv(c, fin_kw["BLOCK_C"]),)](
            ws, save_invstd, grad_weight, grad_bias, c, p_stride, float(count), **fin_kw,
            **fin_opts)
        if training:
            _launch_apply(_bwd_apply_tuned, _bn_bwd_apply_kernel, view,
                          (grad_pre, x, grad_x, save_mean, save_invstd, weight, ws,
                           *view.args()),
                          common, apply_cfg)
    return grad_weight, grad_bias


def add_act(x, residual, relu, out):
    """Writes out = act(x + residual) into out and returns it.  x, residual and out have one shape,
    dtype and memory format (any dimension; dense: contiguous or channels_last)."""
    return _add_act(x, residual, relu, out)


def _add_act(x, residual, relu, out, config=None):
    _check_dtype(x, "add_act")
    dense = x.is_contiguous() or (x.dim() == 4
                                  and x.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        raise ValueError(f"add_act (Triton): x must be contiguous or channels_last, got strides "
                         f"{x.stride()} for shape {tuple(x.shape)}")
    for t, name in ((residual, "residual"), (out, "out")):
        if not _same_offsets(t, x) or t.dtype != x.dtype:
            raise ValueError(f"add_act (Triton): {name} must have x's shape, dtype and memory "
                             "format")
    numel = x.numel()
    if numel == 0:
        return out
    if config is None and (INTERPRET or _deterministic()):
        config = add_configs(numel)[0]
    with _device_ctx(x):
        if config is None:
            _add_tuned[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
                x, residual, out, numel, RELU=bool(relu))
        else:
            kw, opts = _as_config(config)
            _add_act_kernel[(triton.cdiv(numel, kw["BLOCK"]),)](
                x, residual, out, numel, RELU=bool(relu), **kw, **opts)
    return out
