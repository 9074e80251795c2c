"""conv_stats in Triton: the implicit-GEMM conv of ``conv_bn_act.py`` with the previous BatchNorm + ReLU
applied to its input tiles (the prologue) and the batch statistics of its output reduced in its epilogue.

    z = relu(x * scale[c] + shift[c])   (no ReLU for RELU=False; z = x without PROLOGUE)
    y = conv2d(z, w),   mean[co], var[co] = batch statistics of y over N, H, W

Kernels
-------
``_conv_stats_kernel``: ``conv_bn_act._conv_gemm_kernel``'s grid and main loop, the same code: it calls
    ``conv_bn_act._program_tile`` and ``_conv_mainloop`` (program order, index math, both K-loop variants:
    tap loop, flat-K loop; the flat-K loop also serves depthwise and other small grouped convs) with
    ``PROLOGUE``: each A tile, right after its load and before ``tl.dot``, becomes
    ``max(a * scale[c] + shift[c], 0)`` in fp32, cast back to x's dtype, and then the padding and bounds
    mask is applied to that: padded positions of z are 0, never relu(shift) (``conv_bn_act._bn_prologue``).
    Epilogue: y stored once in x's dtype; from the fp32 accumulator (before y is rounded), the tile's
    per-column mean and M2 (sum of squared deviations from that mean) over its valid rows, stored to row
    ``pid_m`` of ``[tiles, C_out]`` partial buffers, and the row count of the tile to ``count[pid_m]``.
    No atomics: each program owns its (tile row, columns) slot.
``_combine_stats_kernel``: per block of channels, walks the partial rows in order, BLOCK_T rows at a time:
    the block's rows are merged with the k-part form of Chan's formula (count-weighted mean of the means,
    M2 plus the counts times the squared spread of the means), then merged into the running total with
    Chan's pairwise formula. Fixed order and fixed tiles: deterministic; deviations instead of
    E[y^2] - E[y]^2: accurate when the mean is large against the spread.
``_bn_add_relu_kernel``: the exit of a block training on conv_stats, relu(y * scale + shift + shortcut'), the
    shortcut being x or a downsample branch's conv_stats output with its BN applied in the same pass.

The partial buffers have a row per BLOCK_M tile of the smallest BLOCK_M any config has, because the
autotuner picks BLOCK_M after the buffers exist; ``count`` starts at zero (and the autotuner resets it
between the configs it times), so rows a larger tile leaves unwritten count for nothing. Counts are fp32:
the running total is exact below 2^24 pixels (ResNet-50's largest conv output at batch 256 has 3.2M).

Configs: ``conv_bn_act.py``'s tiles that compile without spills with this epilogue (see
``STATS_CONFIGS_TAP``). ``aot.py --family stats`` compiles them for sm_80 and sm_90. Interpreter
(``TRITON_INTERPRET=1``): one tile (``INTERPRET_STATS_CONFIG``, clamped to the problem); bf16 ``tl.dot`` is
wrong there (ENV.md), so bf16 is tested on a GPU only.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .conv_bn_act import (CONV_AUTOTUNE_KEY, FP32_INPUT_PRECISION, INTERPRET, K_FLAT_BELOW, _conv_mainloop, _extent,
                          _INT32_LIMIT, _next_pow2, _out_size, _program_tile)

__all__ = ["conv_stats", "bn_add_relu", "stats_configs", "ALL_STATS_CONFIGS", "COMBINE_CONFIG", "EXIT_CONFIG",
           "KERNELS", "INTERPRET"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# conv_bn_act.py's tiles that compile without register spills here (aot.py --family stats, sm_80 and sm_90):
# the statistics epilogue keeps the accumulator live through two column reductions, and with it the
# 128x256 / 256x128 tiles and the 4-warp 128x128x32 tile spilled 12-136 bytes (16-bit), and the fp32 FMA
# tiles above 64x64 spilled 20-40 bytes on sm_90. Splitting the epilogue into column slices, as
# conv_bn_act.py does for the residual, made it worse (up to 1.1 KB: the slices' layout conversions).
# With int64 index math (tensors of 2^30 elements or more) the tiles with BLOCK_M 128 spilled 4-16 bytes:
# those problems get the BLOCK_M 64 tiles only.
# TODO(gpu): timed on no GPU yet; the wide tiles may be worth a spill-free statistics epilogue.
STATS_CONFIGS_TAP = [  # 16-bit, tap loop, both archs
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]
STATS_CONFIGS_FLAT = [  # 16-bit, flat-K loop (stem, small grouped convs)
    _cfg(128, 64, 64, 8, 3),
    _cfg(128, 64, 32, 8, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 5),
]
STATS_CONFIGS_FP32 = [_cfg(32, 64, 32, 4, 3)]  # the one fp32 tile without spills on every case
ALL_STATS_CONFIGS = STATS_CONFIGS_TAP + STATS_CONFIGS_FLAT + STATS_CONFIGS_FP32


def stats_configs(fp32: bool, k_flat: bool, index_64: bool, cin_g: int, cout_g: int, k_total: int):
    """The configs the autotuner tries for one problem: the list by dtype and loop variant (the same for
    sm_80 and sm_90), only BLOCK_M <= 64 with int64 index math, BLOCK_N / BLOCK_K shrunk where they overshoot
    the problem, never below 16 (tl.dot minimum), duplicates dropped, as conv_bn_act.conv_configs. aot.py
    compiles these."""
    base = STATS_CONFIGS_FP32 if fp32 else STATS_CONFIGS_FLAT if k_flat else STATS_CONFIGS_TAP
    if index_64:
        base = [c for c in base if c.kwargs["BLOCK_M"] <= 64]
    return _clamped(base, k_flat, cin_g, cout_g, k_total)


def _clamped(base, k_flat, cin_g, cout_g, k_total):
    max_bn = max(16, _next_pow2(cout_g))
    max_bk = max(16, _next_pow2(k_total if k_flat else cin_g))
    out, seen = [], set()
    for c in base:
        kw = dict(c.kwargs, BLOCK_N=min(c.kwargs["BLOCK_N"], max_bn), BLOCK_K=min(c.kwargs["BLOCK_K"], max_bk))
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# Under TRITON_INTERPRET=1: one tile, as conv_bn_act.py, but up to 64 wide in N and K, clamped to the problem:
# the interpreter's cost is per program and per loop step, and ResNet's wide layers took minutes with 16x16.
INTERPRET_STATS_CONFIG = _cfg(32, 64, 64, 4, 1, group_m=4)
# The combine kernel's tile: BLOCK_T partial rows x BLOCK_C channels per step.
COMBINE_CONFIG = {"BLOCK_T": 32, "BLOCK_C": 64}


def _prune_stats_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return stats_configs(args["x_ptr"].dtype == torch.float32, bool(args["K_FLAT"]), bool(args["INDEX_64"]),
                         int(args["CIN_G"]), int(args["COUT_G"]), int(args["K_TOTAL"]))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv_stats_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, count_ptr, mean_ptr, m2_ptr,
    # sizes
    M, H, W, HO, WO, C_OUT, CIN_G, COUT_G, K_TOTAL,
    # strides, in elements: input, output (N, C, H, W order)
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    # filter geometry
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    # prologue, loop variant, index width
    PROLOGUE: tl.constexpr, RELU: tl.constexpr,
    K_FLAT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n, g = _program_tile(M, COUT_G, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    acc, n, oh, ow, mask_m, co, mask_n = _conv_mainloop(
        x_ptr, w_ptr, scale_ptr, shift_ptr, pid_m, pid_n, g,
        M, H, W, HO, WO, C_OUT, CIN_G, COUT_G, K_TOTAL, sxn, sxc, sxh, sxw,
        KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        PROLOGUE=PROLOGUE, PROLOGUE_RELU=RELU, K_FLAT=K_FLAT, INPUT_PRECISION=INPUT_PRECISION,
        INDEX_64=INDEX_64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

    # Epilogue: y once, then the tile's statistics from the fp32 accumulator.
    y_row = n * syn + oh * syh + ow * syw
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + (y_row[:, None] + (co * syc)[None, :]), acc.to(y_ptr.dtype.element_ty), mask=mask)
    rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    # Rows past M are 0 in acc (their A rows were masked), so the plain column sum is the valid rows' sum.
    tile_mean = tl.sum(acc, axis=0) / rows
    dev = tl.where(mask_m[:, None], acc - tile_mean[None, :], 0.0)
    tile_m2 = tl.sum(dev * dev, axis=0)
    p_off = pid_m * C_OUT + co
    tl.store(mean_ptr + p_off, tile_mean, mask=mask_n)
    tl.store(m2_ptr + p_off, tile_m2, mask=mask_n)
    if (pid_n == 0) & (g == 0):  # one writer per tile row
        tl.store(count_ptr + pid_m, rows)


@triton.jit
def _combine_stats_kernel(count_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, TILES, C,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        cnt = tl.load(count_ptr + t, mask=t < TILES, other=0.0)
        used = (cnt > 0)[:, None] & mask_c[None, :]  # rows no tile wrote hold garbage
        off = t.to(tl.int64)[:, None] * C + cols[None, :]
        part_mean = tl.load(mean_ptr + off, mask=used, other=0.0)
        part_m2 = tl.load(m2_ptr + off, mask=used, other=0.0)
        # this step's rows, merged: Chan's formula for k parts
        step_count = tl.sum(cnt, axis=0)
        weight = cnt / tl.maximum(step_count, 1.0)
        step_mean = tl.sum(part_mean * weight[:, None], axis=0)
        spread = tl.where(used, part_mean - step_mean[None, :], 0.0)
        step_m2 = tl.sum(part_m2 + cnt[:, None] * spread * spread, axis=0)
        # ... then into the running total, pairwise
        new_total = total + step_count
        frac = tl.where(new_total > 0, step_count / new_total, 0.0)
        delta = step_mean - mean
        mean += delta * frac
        m2 += step_m2 + delta * delta * total * frac
        total = new_total
    tl.store(out_mean_ptr + cols, tl.where(total > 0, mean, float("nan")), mask=mask_c)
    tl.store(out_var_ptr + cols, m2 / total, mask=mask_c)  # 0 / 0 = NaN for an empty batch


@triton.jit
def _bn_add_relu_kernel(y_ptr, scale_ptr, shift_ptr, r_ptr, r_scale_ptr, r_shift_ptr, out_ptr, numel, C, HW,
                        CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, R_AFFINE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out = relu(y * scale[c] + shift[c] + r'), r' = r * r_scale[c] + r_shift[c] (R_AFFINE), r, or nothing
    (not HAS_RES): the block's exit in one pass. y, r and out share one dense layout (NCHW or NHWC)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = offs % C if CHANNELS_LAST else (offs // HW) % C
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr + c, mask=mask, other=0.0)
    v += tl.load(shift_ptr + c, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if R_AFFINE:
            r = r * tl.load(r_scale_ptr + c, mask=mask, other=0.0) + tl.load(r_shift_ptr + c, mask=mask, other=0.0)
        v += r
    v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


# The exit kernel's one config: bandwidth-bound, 16-byte accesses per thread at 8 warps.
# TODO(gpu): not timed yet.
EXIT_CONFIG = {"BLOCK": 2048}

# name -> (raw @triton.jit kernel, all its autotune configs), for aot.py.
KERNELS = {
    "conv_stats": (_conv_stats_kernel, ALL_STATS_CONFIGS),
    "combine_stats": (_combine_stats_kernel, [triton.Config(COMBINE_CONFIG, num_warps=4, num_stages=2)]),
    "bn_add_relu": (_bn_add_relu_kernel, [triton.Config(EXIT_CONFIG, num_warps=8, num_stages=1)]),
}

if INTERPRET:
    _conv_stats_tuned = None
else:
    _conv_stats_tuned = triton.autotune(
        configs=ALL_STATS_CONFIGS,
        key=CONV_AUTOTUNE_KEY + ["PROLOGUE"],
        prune_configs_by={"early_config_prune": _prune_stats_configs},
        reset_to_zero=["count_ptr"],
    )(_conv_stats_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def conv_stats(x, weight, scale, shift, stride, padding, dilation, groups, relu, out):
    """Writes y = conv2d(z, weight) to ``out`` (allocated by the caller in the memory format it wants) and
    returns (out, mean, var): z as in the module docstring, mean and biased variance per output channel
    in float32. scale/shift: (C_in,) in x's dtype or float32, or both None. Arguments are assumed
    validated by the caller (resnet_fused.ops.conv_stats)."""
    return _launch(x, weight, scale, shift, stride, padding, dilation, groups, relu, out)


def _launch(x, weight, scale, shift, stride, padding, dilation, groups, relu, out, k_flat=None, index_64=None,
            config=None):
    """``conv_stats`` with test hooks: ``k_flat`` forces the K-loop variant, ``index_64`` the index width,
    ``config`` (a dict of tile constexprs, or a ``triton.Config``) bypasses the autotuner and the
    interpreter's fixed config."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"conv_stats (Triton) supports float32, float16 and bfloat16, got {x.dtype}; "
                        "route float64 to the reference implementation")
    N, C_in, H, W = x.shape
    C_out, cin_g, KH, KW = weight.shape
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    groups = int(groups)
    cout_g = C_out // groups
    HO, WO = _out_size(H, KH, sh, ph, dh), _out_size(W, KW, sw, pw, dw)
    assert tuple(out.shape) == (N, C_out, HO, WO) and out.dtype == x.dtype, "out has the wrong shape or dtype"
    M = N * HO * WO
    mean = torch.full((C_out,), float("nan"), dtype=torch.float32, device=x.device)
    var = torch.full((C_out,), float("nan"), dtype=torch.float32, device=x.device)
    if M == 0:
        return out, mean, var
    if not (INTERPRET or x.is_cuda):
        raise ValueError("conv_stats (Triton) needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")

    w_packed = weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, C_in/groups, C_out), as conv_bn_act.py
    prologue = scale is not None
    scale_arg = scale.contiguous() if prologue else out  # dummy pointers when absent, never read
    shift_arg = shift.contiguous() if prologue else out
    launch_opts = {}
    if isinstance(config, triton.Config):
        launch_opts = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        config = dict(config.kwargs)
    k_flat = cin_g < K_FLAT_BELOW if k_flat is None else bool(k_flat)
    if config is None and INTERPRET:
        config = dict(_clamped([INTERPRET_STATS_CONFIG], k_flat, cin_g, cout_g, KH * KW * cin_g)[0].kwargs)
    if config is not None:
        min_block_m = config["BLOCK_M"]
    else:
        min_block_m = min(c.kwargs["BLOCK_M"] for c in ALL_STATS_CONFIGS)
    tiles = triton.cdiv(M, min_block_m)
    count = torch.zeros(tiles, dtype=torch.float32, device=x.device)
    part_mean = torch.empty(tiles, C_out, dtype=torch.float32, device=x.device)
    part_m2 = torch.empty(tiles, C_out, dtype=torch.float32, device=x.device)

    if index_64 is None:
        index_64 = M >= _INT32_LIMIT or any(_extent(t) >= _INT32_LIMIT for t in (x, out, w_packed))
    common = dict(KH=KH, KW=KW, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, DIL_H=dh, DIL_W=dw,
                  PROLOGUE=prologue, RELU=bool(relu), K_FLAT=k_flat,
                  INPUT_PRECISION=FP32_INPUT_PRECISION if x.dtype == torch.float32 else "ieee",
                  INDEX_64=bool(index_64))
    args = (x, w_packed, scale_arg, shift_arg, out, count, part_mean, part_m2, M, H, W, HO, WO, C_out, cin_g,
            cout_g, KH * KW * cin_g, *x.stride(), *out.stride())
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if config is not None:
            grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(cout_g, config["BLOCK_N"]), groups)
            _conv_stats_kernel[grid](*args, **common, **config, **launch_opts)
        else:
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)
            _conv_stats_tuned[grid](*args, **common)
        _combine_stats_kernel[(triton.cdiv(C_out, COMBINE_CONFIG["BLOCK_C"]),)](
            count, part_mean, part_m2, mean, var, tiles, C_out, **COMBINE_CONFIG)
    return out, mean, var


def bn_add_relu(y, scale, shift, residual, residual_scale, residual_shift, out):
    """Writes relu(y * scale[c] + shift[c] + residual') to ``out`` and returns it, residual' being
    residual * residual_scale[c] + residual_shift[c] when those are given, else residual (or 0 for None).
    y, residual and out share one shape and dense layout; scale, shift and the residual's are contiguous (C,)."""
    numel = y.numel()
    if numel == 0:
        return out
    channels_last = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    affine = residual_scale is not None
    grid = (triton.cdiv(numel, EXIT_CONFIG["BLOCK"]),)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        # unused pointers get y's or scale's (never read)
        _bn_add_relu_kernel[grid](y, scale, shift, y if residual is None else residual,
                                  residual_scale if affine else scale, residual_shift if affine else shift, out,
                                  numel, y.shape[1], y.shape[2] * y.shape[3], CHANNELS_LAST=channels_last,
                                  HAS_RES=residual is not None, R_AFFINE=affine,
                                  **EXIT_CONFIG, **({} if INTERPRET else {"num_warps": 8}))
    return out
