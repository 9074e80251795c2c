"""Ahead-of-time compile checks for the Triton kernels, without a GPU.

Every autotune config of every kernel in ``conv_bn_act.KERNELS`` (``--family conv``, the default),
``bn_act.KERNELS`` (``--family bn``: BatchNorm + add + ReLU forward and backward, add + ReLU) and
``conv_stats.KERNELS`` (``--family stats``: the conv with the BN prologue and statistics epilogue, and
its combine kernel; ``--family all`` for every family) is compiled with ``triton.compile`` for sm_80 (A100) and sm_90
(H100/H200), for each dtype, on representative ResNet-50 specializations (``default_cases()``,
``bn_cases()``).  For each compile we report:

* ``mma``: the tensor-core instruction family found in the PTX: ``wgmma`` (Hopper warpgroup MMA),
  ``mma.sync`` (Ampere-style MMA, also used on Hopper when a tile cannot use wgmma), or ``none``;
* ``tensor_cores``: whether the kernel uses the arch's expected one (``mma.sync`` on sm_80,
  ``wgmma`` on sm_90); always False for the depthwise kernel and the bn_act kernels (no tl.dot:
  bandwidth-bound) and for fp32 with ``input_precision="ieee"`` (FMA path, by design; see
  conv_bn_act.py);
* ``reg`` / ``stack`` / ``local``: from ``cuobjdump -res-usage`` on the cubin (Triton ships
  cuobjdump).  Register spills show up as ``STACK`` (the per-thread stack frame), not ``LOCAL``
  (checked: a kernel with ``STACK:8 LOCAL:0`` had "8 bytes spill stores" in ``ptxas -v``);
* ``spill_stores`` / ``spill_loads`` / ``ptxas_regs``: from ``ptxas -v`` (Triton's own ptxas log,
  or ptxas rerun on the PTX when the kernel came from Triton's cache); ``spills`` is True when
  either source shows spilling;
* ``shared_bytes``: the dynamic shared memory Triton allocates (cuobjdump's SHARED is only the
  static part).

This must run WITHOUT ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` returns an
interpreted function that cannot be compiled.  Run ``python -m resnet_fused.triton_kernels.aot``
for a table (``--help`` for options).

Signatures mirror what Triton's runtime specialization would produce for the case's arguments
(``native_specialize_impl``): an int equal to 1 becomes a constexpr (the channel stride 1 of
NHWC tensors: the fast path), ints divisible by 16 get ``tt.divisibility=16``, pointers are
assumed 16-byte aligned (torch allocations are).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32")
EXPECTED_MMA = {80: "mma.sync", 90: "wgmma"}

_TORCH_TO_TRITON = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _nhwc_strides(n, c, h, w):
    # (sn, sc, sh, sw) of a channels_last tensor
    return (h * w * c, 1, w * c, c)


@dataclasses.dataclass(frozen=True)
class Case:
    """One representative specialization of a kernel: its runtime ints and constexprs."""
    name: str
    kernel: str  # key of conv_bn_act.KERNELS or bn_act.KERNELS
    ints: dict  # non-pointer runtime arguments, by name (floats for fp32 arguments)
    constexprs: dict  # constexpr arguments except the tile sizes (those come from the config)
    # pointer arguments whose element type is not the compile's dtype (e.g. fp32 statistics)
    ptr_dtypes: dict = dataclasses.field(default_factory=dict)
    # compile only the first N configs (variants of a kernel already covered in full elsewhere)
    config_limit: int | None = None
    # compile only for these dtypes (kernels whose pointers are all fp32 whatever the model's)
    only_dtypes: tuple | None = None


def _gemm_case(name, n, c_in, h, c_out, k, s, p, d=1, groups=1, res=True, index_64=None):
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    cin_g, cout_g = c_in // groups, c_out // groups
    x_s, y_s = _nhwc_strides(n, c_in, h, h), _nhwc_strides(n, c_out, ho, ho)
    r_s = y_s if res else (0, 0, 0, 0)
    ints = dict(M=n * ho * ho, H=h, W=h, HO=ho, WO=ho, C_OUT=c_out, CIN_G=cin_g, COUT_G=cout_g,
                K_TOTAL=k * k * cin_g)
    ints.update(zip(("sxn", "sxc", "sxh", "sxw"), x_s))
    ints.update(zip(("srn", "src", "srh", "srw"), r_s))
    ints.update(zip(("syn", "syc", "syh", "syw"), y_s))
    from .conv_bn_act import _INT32_LIMIT, K_FLAT_BELOW
    if index_64 is None:
        index_64 = max(n * c_in * h * h, n * c_out * ho * ho, ints["M"]) >= _INT32_LIMIT
    cx = dict(KH=k, KW=k, STRIDE_H=s, STRIDE_W=s, PAD_H=p, PAD_W=p, DIL_H=d, DIL_W=d,
              HAS_BIAS=True, HAS_RES=res, RELU=True, K_FLAT=cin_g < K_FLAT_BELOW,
              INDEX_64=index_64)
    return Case(name, "conv_gemm", ints, cx)


def _dw_case(name, n, c, h, k, s, p):
    ho = (h + 2 * p - (k - 1) - 1) // s + 1
    x_s, y_s = _nhwc_strides(n, c, h, h), _nhwc_strides(n, c, ho, ho)
    ints = dict(M=n * ho * ho, H=h, W=h, HO=ho, WO=ho, C_OUT=c, COUT_G=1)
    ints.update(zip(("sxn", "sxc", "sxh", "sxw"), x_s))
    ints.update(zip(("srn", "src", "srh", "srw"), y_s))
    ints.update(zip(("syn", "syc", "syh", "syw"), y_s))
    cx = dict(KH=k, KW=k, STRIDE_H=s, STRIDE_W=s, PAD_H=p, PAD_W=p, DIL_H=1, DIL_W=1,
              HAS_BIAS=True, HAS_RES=True, RELU=True, INDEX_64=False)
    return Case(name, "conv_depthwise", ints, cx)


def default_cases():
    """Representative NHWC specializations at batch 32: the tap loop on a ResNet-50 stage-4 3x3
    conv (C=512, so no config is clamped by pruning) and on a stage-3 1x1 expand conv (the most
    common ResNet-50 conv), the flat-K loop on the 7x7 3-channel stem, and the depthwise kernel on
    a 3x3 C=256 layer; plus the 3x3 case with int64 index math forced (as for tensors of 2^30
    elements or more).  Every epilogue feature is on (bias, residual, ReLU) except the stem's
    residual, which ResNet does not have (the 3x3 convs keep it: the worst case)."""
    return [
        _gemm_case("3x3_c512_tap", 32, 512, 7, 512, 3, 1, 1),
        _gemm_case("3x3_c512_tap_i64", 32, 512, 7, 512, 3, 1, 1, index_64=True),
        _gemm_case("1x1_c256_1024", 32, 256, 14, 1024, 1, 1, 0),
        _gemm_case("7x7s2_stem_flat", 32, 3, 224, 64, 7, 2, 3, res=False),
        _dw_case("dw3x3_c256", 32, 256, 14, 3, 1, 1),
    ]


# bn_act.py: the BatchNorm(+add)+ReLU kernels and add_act.  Activations in the compile's dtype,
# everything else (parameters, running and saved statistics, workspace) fp32: the usual mixed
# precision setup (fp32 BN parameters under autocast), and what fp32 runs use anyway.
_BN_FP32_PTRS = ("ws_ptr", "w_ptr", "b_ptr", "rm_ptr", "rv_ptr", "mean_ptr", "var_ptr",
                 "invstd_ptr", "save_mean_ptr", "save_invstd_ptr", "new_rm_ptr", "new_rv_ptr",
                 "gw_ptr", "gb_ptr")
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_P", "BLOCK_T", "BLOCK_C", "BLOCK")


def _bn_view_ints(n, c, h, nhwc):
    """The (N_OUTER, R, C, strides) runtime ints of bn_act.py's view of an (n, c, h, h) tensor."""
    s = h * h
    if nhwc:
        return dict(N_OUTER=1, R=n * s, C=c, stride_o=0, stride_r=c, stride_c=1)
    return dict(N_OUTER=n, R=s, C=c, stride_o=c * s, stride_r=1, stride_c=s)


def _bn_case(name, kernel, n, c, h, nhwc, config_limit=None, index_64=False, **constexprs):
    from .bn_act import MAX_PARTIALS
    ints = _bn_view_ints(n, c, h, nhwc)
    if kernel in ("bn_stats", "bn_bwd_reduce"):
        ints["P_STRIDE"] = MAX_PARTIALS * c
    if kernel == "bn_apply":
        ints["eps"] = 1e-5
    cx = dict(CL=nhwc, INDEX_64=index_64, **constexprs)
    return Case(name, kernel, ints, cx, ptr_dtypes=dict.fromkeys(_BN_FP32_PTRS, "fp32"),
                config_limit=config_limit)


def bn_cases():
    """Representative specializations of every bn_act.py kernel at batch 32 (ResNet-50 layer-1
    sizes: C=256 at 56x56, so that no config is clamped by the problem): every config of every
    kernel in NHWC (the fast path) and NCHW (H*W = 3136, a multiple of 16: vector loads), in
    training with ReLU and residual (the most code); on their first config, the eval variants,
    the 7x7 NCHW plane (49 pixels: no vector loads, capped tiles) and int64 lane offsets; the
    finalize kernels (fp32 pointers only: compiled once per arch) and add_act."""
    big = dict(n=32, c=256, h=56)
    cases = []
    for nhwc, fmt in ((True, "nhwc"), (False, "nchw")):
        cases += [
            _bn_case(f"stats_{fmt}", "bn_stats", **big, nhwc=nhwc),
            _bn_case(f"apply_train_{fmt}", "bn_apply", **big, nhwc=nhwc, HAS_RES=True, RELU=True,
                     EVAL=False),
            _bn_case(f"bwd_reduce_train_{fmt}", "bn_bwd_reduce", **big, nhwc=nhwc, RELU=True,
                     EVAL=False),
            _bn_case(f"bwd_apply_{fmt}", "bn_bwd_apply", **big, nhwc=nhwc),
            _bn_case(f"apply_eval_{fmt}", "bn_apply", **big, nhwc=nhwc, config_limit=1,
                     HAS_RES=True, RELU=True, EVAL=True),
            _bn_case(f"bwd_reduce_eval_{fmt}", "bn_bwd_reduce", **big, nhwc=nhwc, config_limit=1,
                     RELU=True, EVAL=True),
        ]
    seven = dict(n=32, c=2048, h=7, nhwc=False, config_limit=1)
    cases += [
        _bn_case("stats_nchw_7x7", "bn_stats", **seven),
        _bn_case("apply_nchw_7x7", "bn_apply", **seven, HAS_RES=True, RELU=True, EVAL=False),
        _bn_case("bwd_reduce_nchw_7x7", "bn_bwd_reduce", **seven, RELU=True, EVAL=False),
        _bn_case("bwd_apply_nchw_7x7", "bn_bwd_apply", **seven),
    ]
    i64 = dict(n=32, c=256, h=56, nhwc=True, config_limit=1, index_64=True)
    cases += [
        _bn_case("stats_i64", "bn_stats", **i64),
        _bn_case("apply_i64", "bn_apply", **i64, HAS_RES=True, RELU=True, EVAL=False),
        _bn_case("bwd_reduce_i64", "bn_bwd_reduce", **i64, RELU=True, EVAL=False),
        _bn_case("bwd_apply_i64", "bn_bwd_apply", **i64),
    ]
    fp32_ptrs = dict.fromkeys(_BN_FP32_PTRS, "fp32")
    cases += [
        Case("stats_finalize", "bn_stats_finalize",
             dict(C=256, P_STRIDE=1024 * 256, count=100352.0, momentum=0.1, eps=1e-5), {},
             ptr_dtypes=fp32_ptrs, only_dtypes=("fp32",)),
        Case("bwd_finalize", "bn_bwd_finalize", dict(C=256, P_STRIDE=1024 * 256, count=100352.0),
             {}, ptr_dtypes=dict(fp32_ptrs, gw_ptr="fp32", gb_ptr="fp32"),
             only_dtypes=("fp32",)),
        Case("add_act", "add_act", dict(numel=32 * 256 * 56 * 56), dict(RELU=True)),
    ]
    return cases


# conv_stats.py: activations and weights in the compile's dtype; BN scale/shift (float32 under autocast)
# and the statistics buffers fp32.
_STATS_FP32_PTRS = ("scale_ptr", "shift_ptr", "count_ptr", "mean_ptr", "m2_ptr", "out_mean_ptr", "out_var_ptr",
                    "r_scale_ptr", "r_shift_ptr")


def _stats_case(name, n, c_in, h, c_out, k, s, p, prologue=True, index_64=False, config_limit=None):
    gemm = _gemm_case(name, n, c_in, h, c_out, k, s, p, index_64=index_64)
    ints = {key: v for key, v in gemm.ints.items() if not key.startswith("sr")}
    cx = {key: v for key, v in gemm.constexprs.items() if key not in ("HAS_BIAS", "HAS_RES")}
    cx["PROLOGUE"] = prologue
    return Case(name, "conv_stats", ints, cx, ptr_dtypes=dict.fromkeys(_STATS_FP32_PTRS, "fp32"),
                config_limit=config_limit)


def stats_cases():
    """conv_stats.py at batch 32: the tap loop with the prologue on a stage-4 3x3 conv (C=512: no config
    clamped) and a stage-3 1x1 expand conv, the flat-K loop on the stem (no prologue: it reads the image),
    int64 index math, the combine kernel (fp32 pointers only), and the block exit with a downsample
    branch's BN (NHWC and NCHW)."""
    return [
        _stats_case("3x3_c512_tap", 32, 512, 7, 512, 3, 1, 1),
        _stats_case("3x3_c512_tap_i64", 32, 512, 7, 512, 3, 1, 1, index_64=True),
        _stats_case("1x1_c256_1024", 32, 256, 14, 1024, 1, 1, 0),
        _stats_case("7x7s2_stem_flat", 32, 3, 224, 64, 7, 2, 3, prologue=False),
        Case("combine_stats", "combine_stats", dict(TILES=32 * 56 * 56 // 64, C=256), {},
             ptr_dtypes=dict.fromkeys(_STATS_FP32_PTRS, "fp32"), only_dtypes=("fp32",)),
    ] + [Case(f"bn_add_relu_{fmt}", "bn_add_relu", dict(numel=32 * 256 * 56 * 56, C=256, HW=56 * 56),
              dict(CHANNELS_LAST=fmt == "nhwc", HAS_RES=True, R_AFFINE=True),
              ptr_dtypes=dict.fromkeys(_STATS_FP32_PTRS, "fp32")) for fmt in ("nhwc", "nchw")]


def _bn_configs_for(case: Case, dtype: str):
    """bn_act.kernel_configs for the case and dtype, without configs that differ only in SPLIT (a
    grid parameter: same code), cut to ``case.config_limit``."""
    from . import bn_act
    out, seen = [], set()
    elem_size = 4 if dtype == "fp32" else 2
    for c in bn_act.kernel_configs(case.kernel, case.ints, case.constexprs, elem_size):
        key = (tuple(sorted((k, v) for k, v in c.kwargs.items() if k != "SPLIT")), c.num_warps,
               c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out[:case.config_limit] if case.config_limit else out


def _bn_kernel_names():
    from . import bn_act
    return bn_act.KERNELS


def _kernel_fn(name: str):
    """The raw @triton.jit function of a kernel name of either family."""
    from . import bn_act, conv_bn_act, conv_stats
    if name in bn_act.KERNELS:
        return bn_act.KERNELS[name]
    if name in conv_stats.KERNELS:
        return conv_stats.KERNELS[name][0]
    return conv_bn_act.KERNELS[name][0]


def all_cases():
    return default_cases() + bn_cases() + stats_cases()


FAMILIES = {"conv": default_cases, "bn": bn_cases, "stats": stats_cases, "all": all_cases}


# ----------------------------------------------------------------------------------------------
def _require_compiled_mode():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot compile checks must run with TRITON_INTERPRET unset "
                           "(the interpreter replaces @triton.jit kernels)")


def _signature(fn, case: Case, dtype: str, tile: dict):
    """(signature, constexprs, attrs) for ASTSource, as the runtime would specialize them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, cx, attrs = {}, {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            sig[name] = "*" + _TORCH_TO_TRITON[case.ptr_dtypes.get(name, dtype)]
            attrs[(idx,)] = BaseBackend.parse_attr("D")
        elif name in case.ints:
            value = case.ints[name]
            value = value if isinstance(value, float) else int(value)
            ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
            sig[name] = ty
            if ty == "constexpr":
                cx[name] = spec
            elif spec:
                attrs[(idx,)] = BaseBackend.parse_attr(spec)
        else:
            sig[name] = "constexpr"
            if name in tile:
                cx[name] = tile[name]
            elif name == "INPUT_PRECISION":
                from .conv_bn_act import FP32_INPUT_PRECISION  # the launcher's choice
                cx[name] = FP32_INPUT_PRECISION if dtype == "fp32" else "ieee"
            else:
                cx[name] = case.constexprs[name]
    return sig, cx, attrs


def _ptxas_info(log: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` output."""
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["ptxas_regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out


def _rerun_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on the PTX, for a compile that came from Triton's cache (no log then)."""
    import triton
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        return subprocess.run([str(ptxas), "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                               f.name, "-o", os.devnull], capture_output=True, text=True,
                              check=True).stderr


def _res_usage(cubin: bytes) -> dict:
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        res[key.lower()] = int(m.group(1)) if m else None
    return res


def configs_for(case: Case, arch: int, dtype: str):
    """The configs the autotuner would try for this case on this arch and dtype."""
    from . import bn_act, conv_stats
    from . import conv_bn_act as mod
    if case.kernel in bn_act.KERNELS:
        return _bn_configs_for(case, dtype)
    if case.kernel in ("combine_stats", "bn_add_relu"):
        return conv_stats.KERNELS[case.kernel][1]
    if case.kernel == "conv_stats":
        i = case.ints
        configs = conv_stats.stats_configs(dtype == "fp32", case.constexprs["K_FLAT"], case.constexprs["INDEX_64"],
                                           i["CIN_G"], i["COUT_G"], i["K_TOTAL"])
        return configs[:case.config_limit] if case.config_limit else configs
    if case.kernel == "conv_depthwise":
        return list(mod.DW_CONFIGS)
    i = case.ints
    return mod.conv_configs(dtype == "fp32", case.constexprs["K_FLAT"], arch, i["CIN_G"],
                            i["COUT_G"], i["K_TOTAL"])


def compile_one(case: Case, arch: int, dtype: str, config_index: int, tile: dict,
                num_warps: int, num_stages: int) -> dict:
    """Compile one (case, arch, dtype, config) and summarize it.  Never raises: a failed
    compile is reported with ``ok=False`` and the error."""
    _require_compiled_mode()
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    fn = _kernel_fn(case.kernel)
    row = dict(kernel=case.kernel, case=case.name, arch=arch, dtype=dtype, config=config_index,
               tile=dict(tile), num_warps=num_warps, num_stages=num_stages)
    t0 = time.perf_counter()
    try:
        sig, cx, attrs = _signature(fn, case, dtype, tile)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
        log = io.StringIO()
        # Triton runs ptxas -v itself and prints the log with this knob (on a cache miss).
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = k.asm["ptx"]
        info = _ptxas_info(log.getvalue())
        if "spill_stores" not in info:
            info = _ptxas_info(_rerun_ptxas(ptx, arch))
        mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
        row.update(ok=True, mma=mma, tensor_cores=(mma == EXPECTED_MMA[arch]),
                   **_res_usage(k.asm["cubin"]), **info, shared_bytes=k.metadata.shared)
        row["spills"] = row.get("spill_stores", 0) > 0 or row.get("stack", 0) > 0
    except Exception as e:  # report, do not abort the sweep
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_star(args):
    return compile_one(*args)


def jobs(archs=ARCHS, dtypes=DTYPES, cases=None):
    """All (case, arch, dtype, config_index, tile, num_warps, num_stages) to compile."""
    out = []
    for case in cases or default_cases():
        for arch in archs:
            for dtype in dtypes:
                if case.only_dtypes and dtype not in case.only_dtypes:
                    continue
                for i, c in enumerate(configs_for(case, arch, dtype)):
                    out.append((case, arch, dtype, i, dict(c.kwargs), c.num_warps, c.num_stages))
    return out


def compile_all(archs=ARCHS, dtypes=DTYPES, workers=None, cases=None) -> list[dict]:
    """Compile every config the autotuner can try, for each case, arch and dtype; one dict per
    compile (see the module docstring).  ``workers`` processes in parallel (default: CPU count).
    Slowest first, so the pool's tail is short."""
    _require_compiled_mode()
    todo = jobs(archs, dtypes, cases)
    order = sorted(range(len(todo)), key=lambda j: -_cost(todo[j]))
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        done = [compile_one(*todo[j]) for j in order]
    else:
        # spawn: no fork of a process that already holds LLVM/MLIR state
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            done = list(ex.map(_compile_star, [todo[j] for j in order]))
    rows = [None] * len(todo)
    for j, r in zip(order, done):
        rows[j] = r
    return rows


def _cost(job):
    case, _, dtype, _, tile, warps, _ = job
    if case.kernel in _bn_kernel_names():
        return tile.get("BLOCK_R", 1) * tile.get("BLOCK_C", 1) * tile.get("BLOCK", 1) // 64
    return tile.get("BLOCK_M", 1) * tile.get("BLOCK_N", tile.get("BLOCK_C", 1)) * (
        2 if dtype == "fp32" else 1)


def format_table(rows) -> str:
    head = (f"{'kernel':<14} {'case':<17} {'sm':>3} {'dtype':<5} {'cfg':>3} {'tile':<13}"
            f" {'w':>2} {'s':>2} {'ok':<3} {'mma':<9} {'TC':<2} {'regs':>4} {'spill':>5}"
            f" {'smem_KB':>7} {'sec':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["tile"]
        tile = "x".join(str(t[k]) for k in _TILE_KEYS if k in t)
        if t.get("EPI_SPLIT", 1) > 1:
            tile += f"/e{t['EPI_SPLIT']}"
        if r["ok"]:
            tail = (f"{'yes':<3} {r['mma']:<9} {'y' if r['tensor_cores'] else 'n':<2}"
                    f" {r['reg']:>4} {r.get('spill_stores', r['stack']):>5}"
                    f" {r['shared_bytes'] / 1024:>7.0f}")
        else:
            tail = f"{'NO':<3} {r['error'][:60]}"
        lines.append(f"{r['kernel']:<14} {r['case']:<17} {r['arch']:>3} {r['dtype']:<5}"
                     f" {r['config']:>3} {tile:<13} {r['num_warps']:>2} {r['num_stages']:>2} {tail}"
                     f" {r['seconds']:>5}")
    return "\n".join(lines)


# The kernels built on tl.dot, which must use the arch's tensor-core MMA in 16-bit.
GEMM_KERNELS = ("conv_gemm", "conv_stats")


def summary(rows) -> str:
    ok = [r for r in rows if r["ok"]]
    spilled = [r for r in ok if r["spills"]]
    no_tc = [r for r in ok if r["kernel"] in GEMM_KERNELS and r["dtype"] != "fp32"
             and not r["tensor_cores"]]
    return (f"{len(rows)} compiles, {len(rows) - len(ok)} failed, {len(spilled)} with spills, "
            f"{len(no_tc)} 16-bit GEMM compiles without the arch's tensor-core MMA")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="e.g. 80,90")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="e.g. bf16,fp16,fp32")
    ap.add_argument("--family", default="conv", choices=sorted(FAMILIES),
                    help="kernel family: conv (conv_bn_act.py, the default), bn (bn_act.py), "
                    "stats (conv_stats.py), all")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case names (default: all of the family's cases)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--cache-dir", help="TRITON_CACHE_DIR for the compiles (e.g. an empty folder "
                    "to time cold compiles); default: Triton's")
    a = ap.parse_args(argv)
    if a.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = a.cache_dir  # inherited by the spawned workers
    t0 = time.perf_counter()
    cases = FAMILIES[a.family]()
    if a.cases:
        cases = [c for c in cases if c.name in a.cases.split(",")]
    rows = compile_all(tuple(int(v) for v in a.archs.split(",")), tuple(a.dtypes.split(",")),
                       a.workers, cases)
    print(format_table(rows))
    print(f"{summary(rows)}; {time.perf_counter() - t0:.1f} s wall")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
