"""Fused conv2d + bias (folded BatchNorm) + residual + ReLU in one Triton kernel.

    out = act(conv2d(x, w) + bias[c] + residual),   act = ReLU or identity

The epilogue (bias, residual, ReLU) is applied to the fp32 accumulator, followed by a single store
in the input dtype: no intermediate tensor is written to memory.

Kernels
-------
``_conv_gemm_kernel``: implicit GEMM, one program computes a BLOCK_M x BLOCK_N tile of
    out[M = N*Ho*Wo, C_out/groups] for one group (grid axis 1), reducing over
    K = KH*KW*C_in/groups in BLOCK_K chunks with ``tl.dot`` (fp32 accumulator).
    Two K-loop orders, chosen by the constexpr ``K_FLAT``:

    * tap loop (``K_FLAT=False``, C_in/groups >= 16): one flat loop over (kh, kw) outer and C_in
      chunks inner.  Each chunk of the A tile is BLOCK_M pixels x BLOCK_K channels of one filter
      tap, so in NHWC (channels_last, channel stride 1, which Triton specializes as a constant)
      every row of the tile is a contiguous, vectorizable load (16-byte cp.async in the sm_90
      PTX).  Padding is a per-row mask, C_in tails a per-column mask.  The (kh, kw, c) loop is
      flattened into a single ``range`` so the software pipeliner (num_stages) sees one loop, as
      Inductor's conv template does.
    * flat-K loop (``K_FLAT=True``, C_in/groups < 16: the 3-channel stem, small grouped convs): K
      is walked as one index k = (kh*KW + kw)*Cg + c, decomposed per column, so a 7x7x3 stem
      reduces over ceil(147/BLOCK_K) chunks instead of 49 taps each padded from 3 to 16 channels.
      Padding then is a 2-D mask.

    NCHW input works through the same code: all four input strides (and the residual and output
    strides) are kernel arguments, so any memory format gives the right answer; only NHWC gets the
    contiguous-channel fast path.  The weight is repacked once per call in the launcher to
    (KH, KW, C_in/groups, C_out), C_out contiguous: row k of the B operand for group g is
    w_packed[k, g*Cg_out : (g+1)*Cg_out].

    Program ordering: grid axis 0 enumerates (pid_m, pid_n) in GROUP_M-row super-groups (the
    Triton matmul tutorial's L2 swizzle), so consecutive programs share A rows and a band of B.

    The kernel is ``_program_tile`` (that ordering), ``_conv_mainloop`` (pixel indexing and both K
    loops, returning the fp32 accumulator) and the epilogue.  ``conv_stats.py``'s kernel calls the
    same two functions, with the constexpr ``PROLOGUE`` (BatchNorm + ReLU applied to each A tile,
    ``_bn_prologue``), and its own epilogue.  Here ``PROLOGUE=False`` compiles to the same PTX as
    the loop had before it was shared (compared, debug info aside).

``_conv_dw_kernel``: depthwise / channel-multiplier conv (C_in/groups == 1, groups > 1).  A GEMM
    with a reduction of KH*KW per output channel would waste almost all of a tensor-core tile, so
    this is a direct conv: a BLOCK_M pixels x BLOCK_C channels tile, KH*KW unrolled fp32 FMAs.

Index math: the constexpr ``INDEX_64`` (set by the launcher when any tensor extent or M reaches
2^30 elements, margin included for masked padding offsets) makes the pixel index and everything
derived from it (batch, row base offsets, output/residual offsets) int64, from
``pid_m.to(tl.int64)``, so tensors with more than 2^31 elements are addressed correctly; below
that, int32 index math saves registers (measured: it was part of removing spills on the large
tiles).  ih/iw stay int32 (bounded by H/W); padding tests use one unsigned compare per dimension.
The weight offsets are int32 (a filter bank is far below 2^31 elements).

Epilogue: bias, residual and ReLU on the fp32 accumulator, then one store.  ``EPI_SPLIT`` (a
config parameter) runs it on 1, 2 or 4 column slices of the tile one after another, so the
residual tile needs registers for one slice only next to a wide accumulator.  ReLU propagates NaN
like torch.relu.

fp32 precision: fp32 inputs use ``input_precision="ieee"`` (``FP32_INPUT_PRECISION``): exact fp32
products, no tensor cores.  The GPU default would be TF32 (10-bit mantissa: relative errors of
order 1e-3), far above what an fp32 caller expects; fp16/bf16 are the fast paths.
Set ``FP32_INPUT_PRECISION = "tf32"`` to trade accuracy for speed (it is a constexpr, so it is
part of the compile key; the fp32 configs were sized for the FMA path).

Interpreter: under ``TRITON_INTERPRET=1`` (read at import, as Triton itself does) kernels run on CPU
tensors; autotuning means nothing there, so the launcher uses one small fixed config
(``INTERPRET_CONV_CONFIG`` / ``INTERPRET_DW_CONFIG``).  bf16 ``tl.dot`` is wrong in the
interpreter (see /work/shared/ENV.md): test bf16 on a GPU only.

``aot.py`` compiles, without a GPU, for sm_80 and sm_90, every config the autotuner can try
(``conv_configs`` / ``DW_CONFIGS``) of the kernels in ``KERNELS`` on representative problems.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["conv_bn_act", "conv_configs", "CONV_CONFIGS_SM90", "CONV_CONFIGS_SM80",
           "CONV_CONFIGS_FLAT", "CONV_CONFIGS_FP32", "ALL_CONV_CONFIGS", "DW_CONFIGS", "KERNELS",
           "INTERPRET"]

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. at import of this module.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# See the module docstring: exact fp32 products for fp32 inputs.
FP32_INPUT_PRECISION = "ieee"

# C_in/groups below this uses the flat-K loop (see module docstring); at or above it the tap loop.
K_FLAT_BELOW = 16

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Autotune configs
# ----------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, epi_split=1, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "EPI_SPLIT": epi_split},
        num_warps=warps,
        num_stages=stages,
    )


# Implicit-GEMM tiles for A100 (sm_80: mma.sync, 164 KB smem/SM) and H100/H200 (sm_90: wgmma,
# 228 KB smem/SM).  Shared memory per config is stages * (BM*BK + BK*BN) * bytes per element;
# the largest (128x256x64, 3 stages, 16-bit) is 144 KB, inside both.  ResNet-50 spans
# M = N*112*112 .. N*7*7 and C_out = 64 .. 2048, hence both wide (BN 256) and narrow (BN 64) tiles,
# and small 64x64 tiles for the 7x7 stage at small batch.  GROUP_M=8: L2 swizzle width.
# EPI_SPLIT: the epilogue runs in that many column slices.  Register and spill figures below are
# from aot.py (ptxas -v, bias+residual+ReLU on, no GPU needed): without EPI_SPLIT the 128x256 /
# 256x128 tiles spilled 112 / 72 bytes on sm_90 and 128x128x32 (4 warps) 24 bytes; with 4 slices
# none of them spills on sm_90.
# TODO(gpu): the tile shapes are the Triton matmul tutorial's / Inductor's usual ones, not yet
# timed on the H200: prune or extend after a benchmark run.

# 16-bit inputs, tap loop (C_in/groups >= 16: every ResNet conv but the stem).  Shared by both
# archs, then one pair of large tiles per arch.
_CONV_CONFIGS_COMMON = [
    _cfg(128, 128, 64, 8, 3),  # workhorse on both archs
    _cfg(128, 128, 32, 4, 4, epi_split=4),  # 4-warp tile
    _cfg(128, 64, 64, 4, 4),  # C_out = 64 layers
    _cfg(64, 128, 64, 4, 4),  # small M, wide C_out (stage 4 at small batch)
    _cfg(64, 64, 64, 4, 4),  # small everything
    _cfg(64, 64, 32, 4, 5),  # tiny problems / small grouped convs
]
# Hopper: two warpgroups of wgmma on 128x256 / 256x128, BK 64 (144 KB smem at 3 stages).
CONV_CONFIGS_SM90 = [
    _cfg(128, 256, 64, 8, 3, epi_split=4),  # large C_out (stage 3-4 expand convs)
    _cfg(256, 128, 64, 8, 3, epi_split=4),  # large M (early stages, big batch)
] + _CONV_CONFIGS_COMMON
# Ampere: the same shapes with BK 32; with BK 64, 128x256 spilled 8 B (1x1 conv) and 256x128
# 12 B (3x3 conv) on sm_80, with BK 32 neither spills.
CONV_CONFIGS_SM80 = [
    _cfg(128, 256, 32, 8, 3, epi_split=4),
    _cfg(256, 128, 32, 8, 3, epi_split=4),
] + _CONV_CONFIGS_COMMON

# 16-bit inputs, flat-K loop (stem, small grouped convs): the A tile's per-element (kh, kw, c)
# decomposition and 2-D padding mask cost registers; on the 7x7 stem the 128x256, 256x128,
# 128x128x32/4 warps and 128x64/4 warps tiles spilled 96-844 bytes, these do not.
CONV_CONFIGS_FLAT = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 32, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 5),
]

# fp32 inputs: input_precision="ieee" runs the dot on FMA units (no tensor cores), with 4-byte
# tiles in shared memory.  With the 16-bit lists, most tiles above 64x128 spilled (8-784 bytes)
# and the largest took 10-15 s each to compile; at most 64 fp32 accumulators per thread here.
CONV_CONFIGS_FP32 = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 8, 3),  # with 4 warps: 4 B spilled (int64 indexing, sm_80)
    _cfg(128, 64, 32, 8, 3),  # with 4 warps: 8 B spilled (stem, both archs)
    _cfg(64, 64, 16, 4, 3),  # with BK 32: 8 B spilled (3x3, sm_80)
]

# Every GEMM config, for the autotuner's declaration (the prune hook picks the list that applies).
ALL_CONV_CONFIGS = []
for _c in CONV_CONFIGS_SM90 + CONV_CONFIGS_SM80 + CONV_CONFIGS_FLAT + CONV_CONFIGS_FP32:
    if not any(_c.all_kwargs() == _d.all_kwargs() for _d in ALL_CONV_CONFIGS):
        ALL_CONV_CONFIGS.append(_c)
del _c

# Depthwise: no tensor cores, bandwidth-bound; tiles are (pixels, channels).  8 warps: with 4 the
# 9 unrolled taps' loads took 181-246 registers (no spills, but low occupancy).
DW_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_C": 32}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_C": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_C": 64}, num_warps=8, num_stages=1),
]

# The one config used under TRITON_INTERPRET=1 (dot blocks >= 16; few, mid-sized programs are
# fastest in the interpreter, which runs programs one by one with numpy).
INTERPRET_CONV_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4, "EPI_SPLIT": 1}
INTERPRET_DW_CONFIG = {"BLOCK_M": 32, "BLOCK_C": 16}

# Autotune keys: the GEMM shape plus the filter geometry (different constexprs compile different
# kernels anyway; the autotuner also keys on the tensor dtypes).
CONV_AUTOTUNE_KEY = ["M", "COUT_G", "CIN_G", "KH", "KW", "STRIDE_H", "K_FLAT"]
DW_AUTOTUNE_KEY = ["M", "C_OUT", "KH", "KW", "STRIDE_H"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def conv_configs(fp32: bool, k_flat: bool, arch: int, cin_g: int, cout_g: int, k_total: int):
    """The GEMM configs the autotuner tries for one problem, for compute capability ``arch``
    (80, 90, ...).  The list by dtype and loop variant, then BLOCK_N / BLOCK_K shrunk where they
    overshoot the problem (small grouped convs, the stem), never below 16 (tl.dot minimum),
    epilogue slices kept >= 16 columns wide, duplicates dropped.  aot.py compiles exactly these."""
    if fp32:
        base = CONV_CONFIGS_FP32
    elif k_flat:
        base = CONV_CONFIGS_FLAT
    else:
        base = CONV_CONFIGS_SM90 if arch >= 90 else CONV_CONFIGS_SM80
    max_bn = max(16, _next_pow2(cout_g))
    max_bk = max(16, _next_pow2(k_total if k_flat else cin_g))
    out, seen = [], set()
    for c in base:
        kw = dict(c.kwargs)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], max_bn)
        kw["BLOCK_K"] = min(kw["BLOCK_K"], max_bk)
        kw["EPI_SPLIT"] = max(1, min(kw["EPI_SPLIT"], kw["BLOCK_N"] // 16))
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key in seen:
            continue
        seen.add(key)
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _prune_conv_configs(configs, named_args, **kwargs):
    """Autotuner hook: ``conv_configs`` for this call's dtype, loop variant, device and shape."""
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    major, minor = torch.cuda.get_device_capability(x.device)
    return conv_configs(x.dtype == torch.float32, bool(args["K_FLAT"]), 10 * major + minor,
                        int(args["CIN_G"]), int(args["COUT_G"]), int(args["K_TOTAL"]))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _output_pixels(offs_m, HO, WO, sxn, sxh, sxw,
                   STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                   PAD_H: tl.constexpr, PAD_W: tl.constexpr):
    """For output pixel indices offs_m (over N*HO*WO): n, oh, ow, the top-left input coordinates
    ih0/iw0 (int32: bounded by H/W), and the input offset of (n, channel 0, ih0, iw0). That offset may
    point outside the image where padded: every such load is masked."""
    ow = offs_m % WO
    t = offs_m // WO
    oh = t % HO
    n = t // HO
    ih0 = (oh * STRIDE_H - PAD_H).to(tl.int32)
    iw0 = (ow * STRIDE_W - PAD_W).to(tl.int32)
    x_row = n * sxn + oh * (STRIDE_H * sxh) + ow * (STRIDE_W * sxw) - (PAD_H * sxh + PAD_W * sxw)
    return n, oh, ow, ih0, iw0, x_row


@triton.jit
def _program_tile(M, COUT_G, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                  INDEX_64: tl.constexpr):
    """This program's (pid_m, pid_n, g): tile row, tile column and group (grid axis 1), in the
    L2-friendly order: GROUP_M tile-rows share each band of B (weights)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    if INDEX_64:
        # Offsets can pass 2^31: pixel index and everything derived from it in int64.
        pid_m = pid_m.to(tl.int64)
        g = g.to(tl.int64)
    return pid_m, pid_n, g


@triton.jit
def _bn_prologue(a, mask, scale_ptr, shift_ptr, c, c_mask, RELU: tl.constexpr):
    """relu(a * scale[c] + shift[c]) in fp32, cast back to a's dtype, then 0 where mask is off
    (padding, bounds): the padding belongs to the normalized input, not to a."""
    s = tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    t = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    z = a.to(tl.float32) * s[None, :] + t[None, :]
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(mask, z, 0.0).to(a.dtype)


@triton.jit
def _conv_mainloop(
    x_ptr, w_ptr, scale_ptr, shift_ptr, pid_m, pid_n, g,
    M, H, W, HO, WO, C_OUT, CIN_G, COUT_G, K_TOTAL,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr,
    K_FLAT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The implicit-GEMM conv of tile (pid_m, pid_n) of group g: the fp32 accumulator and what an
    epilogue needs to address the tile, (acc, n, oh, ow, mask_m, co, mask_n), co in int64 under
    INDEX_64.  With PROLOGUE each A tile goes through ``_bn_prologue`` (per input channel scale and
    shift, ReLU if PROLOGUE_RELU) before ``tl.dot``; without it scale_ptr / shift_ptr are unused."""
    # Rows: output pixels.  ih0/iw0 are bounded by H/W: int32 in both modes (registers).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n, oh, ow, ih0, iw0, x_row = _output_pixels(offs_m, HO, WO, sxn, sxh, sxw,
                                                STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    c_first = g * CIN_G  # the group's first input channel
    x_row += c_first * sxc

    # Columns: output channels of group g.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT_G
    co = (g * COUT_G).to(tl.int32) + offs_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if K_FLAT:
        # k = (kh*KW + kw)*CIN_G + c, walked in BLOCK_K chunks; padding is a 2-D mask.
        for k0 in range(0, K_TOTAL, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K_TOTAL
            c = offs_k % CIN_G
            tap = offs_k // CIN_G
            dh = (tap // KW) * DIL_H
            dw = (tap % KW) * DIL_W
            if INDEX_64:
                k_off = dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw + c.to(tl.int64) * sxc
            else:
                k_off = dh * sxh + dw * sxw + c * sxc
            # unsigned compare: 0 <= ih < H in one test
            ih = (ih0[:, None] + dh[None, :]).to(tl.uint32)
            iw = (iw0[:, None] + dw[None, :]).to(tl.uint32)
            a_mask = (mask_m[:, None] & mask_k[None, :]) & (ih < H) & (iw < W)
            a = tl.load(x_ptr + (x_row[:, None] + k_off[None, :]), mask=a_mask, other=0.0)
            if PROLOGUE:
                a = _bn_prologue(a, a_mask, scale_ptr, shift_ptr, c_first + c, mask_k,
                                 PROLOGUE_RELU)
            b_ptrs = w_ptr + (offs_k * C_OUT)[:, None] + co[None, :]
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # (kh, kw) outer, channel chunks inner, flattened into one pipelined loop.
        k_chunks = tl.cdiv(CIN_G, BLOCK_K)
        for it in range(0, KH * KW * k_chunks):
            tap = it // k_chunks
            c0 = (it - tap * k_chunks) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            dh = kh * DIL_H
            dw = kw * DIL_W
            if INDEX_64:
                tap_off = dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw
            else:
                tap_off = dh * sxh + dw * sxw
            ih = (ih0 + dh).to(tl.uint32)
            iw = (iw0 + dw).to(tl.uint32)
            row_ok = mask_m & (ih < H) & (iw < W)
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < CIN_G
            a_mask = row_ok[:, None] & mask_c[None, :]
            a_ptrs = x_ptr + (x_row + tap_off)[:, None] + (offs_c * sxc)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if PROLOGUE:
                a = _bn_prologue(a, a_mask, scale_ptr, shift_ptr, c_first + offs_c, mask_c,
                                 PROLOGUE_RELU)
            b_ptrs = w_ptr + ((tap * CIN_G + offs_c) * C_OUT)[:, None] + co[None, :]
            b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if INDEX_64:
        co = co.to(tl.int64)
    return acc, n, oh, ow, mask_m, co, mask_n


@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    # sizes
    M, H, W, HO, WO, C_OUT, CIN_G, COUT_G, K_TOTAL,
    # strides, in elements: input, residual, output (N, C, H, W order)
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    # filter geometry
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    # epilogue, loop variant, index width
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    K_FLAT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):
    pid_m, pid_n, g = _program_tile(M, COUT_G, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    acc, n, oh, ow, mask_m, co, mask_n = _conv_mainloop(
        x_ptr, w_ptr, None, None, pid_m, pid_n, g,
        M, H, W, HO, WO, C_OUT, CIN_G, COUT_G, K_TOTAL, sxn, sxc, sxh, sxw,
        KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        PROLOGUE=False, PROLOGUE_RELU=False, K_FLAT=K_FLAT, INPUT_PRECISION=INPUT_PRECISION,
        INDEX_64=INDEX_64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

    # Epilogue on the fp32 accumulator, then one store.
    r_row = n * srn + oh * srh + ow * srw
    y_row = n * syn + oh * syh + ow * syw
    if EPI_SPLIT == 1:
        _epilogue(acc, co, mask_m, mask_n, b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc,
                  HAS_BIAS, HAS_RES, RELU)
    else:
        # The epilogue in column slices, one after the other: the residual tile and its fp32
        # copy then need registers for one slice only, next to the wide accumulator.
        co_end = (g + 1) * COUT_G
        acc0, acc1 = _split_cols(acc)
        co0, co1 = _split_cols(co[None, :])
        if EPI_SPLIT == 2:
            _epilogue(acc0, co0.reshape(BLOCK_N // 2), mask_m, co0.reshape(BLOCK_N // 2) < co_end,
                      b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc, HAS_BIAS, HAS_RES, RELU)
            _epilogue(acc1, co1.reshape(BLOCK_N // 2), mask_m, co1.reshape(BLOCK_N // 2) < co_end,
                      b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc, HAS_BIAS, HAS_RES, RELU)
        else:
            tl.static_assert(EPI_SPLIT == 4)
            acc00, acc01 = _split_cols(acc0)
            acc10, acc11 = _split_cols(acc1)
            co00, co01 = _split_cols(co0)
            co10, co11 = _split_cols(co1)
            Q: tl.constexpr = BLOCK_N // 4
            _epilogue(acc00, co00.reshape(Q), mask_m, co00.reshape(Q) < co_end,
                      b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc, HAS_BIAS, HAS_RES, RELU)
            _epilogue(acc01, co01.reshape(Q), mask_m, co01.reshape(Q) < co_end,
                      b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc, HAS_BIAS, HAS_RES, RELU)
            _epilogue(acc10, co10.reshape(Q), mask_m, co10.reshape(Q) < co_end,
                      b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc, HAS_BIAS, HAS_RES, RELU)
            _epilogue(acc11, co11.reshape(Q), mask_m, co11.reshape(Q) < co_end,
                      b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc, HAS_BIAS, HAS_RES, RELU)


@triton.jit
def _split_cols(t):
    """Left and right column halves of a 2-D tensor."""
    R: tl.constexpr = t.shape[0]
    C: tl.constexpr = t.shape[1]
    return tl.split(tl.permute(tl.reshape(t, (R, 2, C // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, co, mask_m, mask_n, b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        r_off = r_row[:, None] + (co * src)[None, :]
        acc += tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        # propagate_nan: ReLU(NaN) = NaN, as torch.relu (plain max.f32 would return 0).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y_off = y_row[:, None] + (co * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_dw_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, H, W, HO, WO, C_OUT, COUT_G,
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Depthwise with channel multiplier COUT_G: output channel co reads input channel co // COUT_G.
    pid_m = tl.program_id(0)
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n, oh, ow, ih0, iw0, x_row = _output_pixels(offs_m, HO, WO, sxn, sxh, sxw,
                                                STRIDE_H, STRIDE_W, PAD_H, PAD_W)

    co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = co < C_OUT
    cin = co // COUT_G
    if INDEX_64:
        co = co.to(tl.int64)
        cin = cin.to(tl.int64)
    x_col = cin * sxc

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = (ih0 + kh * DIL_H).to(tl.uint32)
            iw = (iw0 + kw * DIL_W).to(tl.uint32)
            row_ok = mask_m & (ih < H) & (iw < W)
            x_off = (x_row + (kh * DIL_H) * sxh + (kw * DIL_W) * sxw)[:, None] + x_col[None, :]
            xv = tl.load(x_ptr + x_off, mask=row_ok[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * KW + kw) * C_OUT + co, mask=mask_c, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    r_row = n * srn + oh * srh + ow * srw
    y_row = n * syn + oh * syh + ow * syw
    _epilogue(acc, co, mask_m, mask_c, b_ptr, r_ptr, y_ptr, r_row, y_row, src, syc,
              HAS_BIAS, HAS_RES, RELU)


# name -> (raw @triton.jit kernel, all its autotune configs).  aot.py compiles, per
# representative problem, the configs the autotuner would try (``conv_configs`` / ``DW_CONFIGS``).
KERNELS = {
    "conv_gemm": (_conv_gemm_kernel, ALL_CONV_CONFIGS),
    "conv_depthwise": (_conv_dw_kernel, DW_CONFIGS),
}

if INTERPRET:
    _conv_gemm_tuned = None
    _conv_dw_tuned = None
else:
    _conv_gemm_tuned = triton.autotune(
        configs=ALL_CONV_CONFIGS,
        key=CONV_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_conv_configs},
    )(_conv_gemm_kernel)
    _conv_dw_tuned = triton.autotune(configs=DW_CONFIGS, key=DW_AUTOTUNE_KEY)(_conv_dw_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
# int32 index math is used when every tensor's element extent is below this; the margin (2^30
# instead of 2^31) covers the offsets of masked-off padding taps and channel tails, which reach
# past a tensor's extent by less than one image.
_INT32_LIMIT = 1 << 30


def _extent(t: torch.Tensor) -> int:
    """1 + the largest element offset of t (strides are non-negative for torch tensors)."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _needs_int64(x, y, residual, w_packed, M) -> bool:
    tensors = [x, y, w_packed] + ([residual] if residual is not None else [])
    return M >= _INT32_LIMIT or any(_extent(t) >= _INT32_LIMIT for t in tensors)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_bn_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, out) -> torch.Tensor:
    """Writes act(conv2d(x, weight, stride, padding, dilation, groups) + bias[c] + residual) to
    ``out`` and returns it.

    x (N, C_in, H, W) in any strides; weight (C_out, C_in/groups, KH, KW); bias (C_out,) or None;
    residual with the output's shape (any strides) or None; act = ReLU if ``relu`` else identity;
    ``out`` the output, allocated by the caller in the memory format it wants (any strides work;
    channels_last is the fast one). float32 / float16 / bfloat16, fp32 accumulation. float64 raises
    TypeError (``tl.dot`` has no fp64 path here). Arguments are assumed validated by the caller.
    """
    return _launch(x, weight, bias, residual, stride, padding, dilation, groups, relu, out)


def _launch(x, weight, bias, residual, stride, padding, dilation, groups, relu, out, k_flat=None,
            index_64=None, config=None):
    """``conv_bn_act`` with test hooks: ``k_flat`` forces the GEMM kernel's K-loop variant
    (None: chosen by C_in/groups; depthwise shapes still use the depthwise kernel unless k_flat
    is given); ``index_64`` forces the GEMM kernel's index width (None: by tensor extents);
    ``config`` (a dict of tile constexprs, or a ``triton.Config`` to also set num_warps /
    num_stages) bypasses the autotuner and the interpreter's fixed config."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"conv_bn_act (Triton) supports float32, float16 and bfloat16, got {x.dtype}; "
            "tl.dot has no float64 path here, route float64 to the reference implementation")
    assert x.dim() == 4 and weight.dim() == 4, "x and weight must be 4-D"
    assert weight.dtype == x.dtype, "x and weight dtypes differ"

    N, C_in, H, W = x.shape
    C_out, cin_g, KH, KW = weight.shape
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    groups = int(groups)
    assert cin_g * groups == C_in and C_out % groups == 0, "channels do not match groups"
    cout_g = C_out // groups
    HO = _out_size(H, KH, sh, ph, dh)
    WO = _out_size(W, KW, sw, pw, dw)
    assert HO > 0 and WO > 0, "output would be empty in H or W"

    assert tuple(out.shape) == (N, C_out, HO, WO) and out.dtype == x.dtype, "out has the wrong shape or dtype"
    y = out
    M = N * HO * WO
    if y.numel() == 0:
        return y
    if not (INTERPRET or x.is_cuda):
        raise ValueError("conv_bn_act (Triton) needs CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")

    # (KH, KW, C_in/groups, C_out), C_out contiguous: K-major B operand, channels of one tap
    # adjacent.  One small copy per call.
    w_packed = weight.permute(2, 3, 1, 0).contiguous()
    has_bias = bias is not None
    has_res = residual is not None
    b_arg = bias.contiguous() if has_bias else y  # dummy pointer when absent, never read
    r_arg = residual if has_res else y
    if has_res:
        assert tuple(residual.shape) == tuple(y.shape), "residual shape differs from output"
        r_strides = residual.stride()
    else:
        r_strides = (0, 0, 0, 0)

    common = dict(
        KH=KH, KW=KW, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, DIL_H=dh, DIL_W=dw,
        HAS_BIAS=has_bias, HAS_RES=has_res, RELU=bool(relu),
    )
    strides = (*x.stride(), *r_strides, *y.stride())
    launch_opts = {}
    if isinstance(config, triton.Config):
        launch_opts = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        config = dict(config.kwargs)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        index_64 = (_needs_int64(x, y, residual, w_packed, M) if index_64 is None
                    else bool(index_64))
        common["INDEX_64"] = index_64
        if cin_g == 1 and groups > 1 and k_flat is None:
            args = (x, w_packed, b_arg, r_arg, y, M, H, W, HO, WO, C_out, cout_g, *strides)
            if INTERPRET or config is not None:
                cfg = config or INTERPRET_DW_CONFIG
                grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C_out, cfg["BLOCK_C"]))
                _conv_dw_kernel[grid](*args, **common, **cfg, **launch_opts)
            else:
                grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                                     triton.cdiv(C_out, meta["BLOCK_C"]))
                _conv_dw_tuned[grid](*args, **common)
            return y

        if k_flat is None:
            k_flat = cin_g < K_FLAT_BELOW
        precision = FP32_INPUT_PRECISION if x.dtype == torch.float32 else "ieee"
        args = (x, w_packed, b_arg, r_arg, y, M, H, W, HO, WO, C_out, cin_g, cout_g,
                KH * KW * cin_g, *strides)
        common.update(K_FLAT=bool(k_flat), INPUT_PRECISION=precision)
        if INTERPRET or config is not None:
            cfg = config or INTERPRET_CONV_CONFIG
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cout_g, cfg["BLOCK_N"]), groups)
            _conv_gemm_kernel[grid](*args, **common, **cfg, **launch_opts)
        else:
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)
            _conv_gemm_tuned[grid](*args, **common)
    return y

