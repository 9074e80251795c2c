"""Tests of the Triton fused conv kernel: ``resnet_fused.triton_kernels.conv_bn_act``.

* Parity against a float64 reference, with the error bound earned from PyTorch itself:
  err_kernel <= 2 * err_torch_same_dtype + floor (flash-attention's rule), where err_torch is the
  error of the eager PyTorch chain (conv2d + residual + relu) in the same dtype.  On a machine
  without a GPU these run in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors, fp32 and
  fp16 only: bf16 ``tl.dot`` is wrong in the interpreter) on tiny shapes.
* Ahead-of-time compilation of every autotune config for sm_80 / sm_90 (no GPU needed): compiles,
  uses tensor cores, does not spill.
* GPU only: every ResNet-50 conv shape at batch 2 in bf16 / fp16 / fp32, every config on a few
  shapes, and the autotuned path.
"""
import pytest
import torch
from triton_support import DEVICE, aot_compile, gpu_only, require_runnable

from resnet_fused import reference
from resnet_fused.ops._layout import empty_output
from resnet_fused.shapes import RESNET50_CONVS
from resnet_fused.testing import parity
from resnet_fused.triton_kernels import conv_bn_act as mod

require_runnable(mod)

CL = torch.channels_last
CF = torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Reference and error bound
# ----------------------------------------------------------------------------------------------
def make_inputs(n, c_in, hw, c_out, k, stride, padding, dilation, groups, bias, res, fmt, dtype,
                res_fmt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = k
    x = torch.randn(n, c_in, *hw, generator=g, dtype=torch.float64)
    # Kaiming-like scale keeps outputs O(1), so absolute errors compare across shapes.
    w = torch.randn(c_out, c_in // groups, kh, kw, generator=g, dtype=torch.float64)
    w /= (c_in // groups * kh * kw) ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    ho = (hw[0] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (hw[1] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    r = torch.randn(n, c_out, ho, wo, generator=g, dtype=torch.float64) if res else None

    def cast(t, f=fmt):
        return None if t is None else t.to(DEVICE, dtype).contiguous(memory_format=f)

    return cast(x), cast(w, CF), cast(b, CF), cast(r, res_fmt or fmt)


def launch(x, w, b, r, stride, padding, dilation, groups, relu, **hooks):
    """The launcher with an output in the memory format the ops give (resnet_fused.ops._layout)."""
    (kh, kw), (h, wd) = w.shape[2:], x.shape[2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = empty_output(x, (x.shape[0], w.shape[0], ho, wo))
    return mod._launch(x, w, b, r, stride, padding, dilation, groups, relu, out, **hooks)


def check_parity(x, w, b, r, stride, padding, dilation, groups, relu, y):
    """The project's bound (resnet_fused.testing.parity): error against float64 at most twice the
    eager chain's in the same dtype, plus a few ulps."""
    to64 = [None if t is None else t.double() for t in (x, w, b, r)]
    oracle = reference.conv_bn_act(*to64, stride, padding, dilation, groups, relu)
    assert y.shape == oracle.shape and y.dtype == x.dtype
    result = parity(y, reference.conv_bn_act(x, w, b, r, stride, padding, dilation, groups, relu), oracle)
    assert result.ok, str(result)


# ----------------------------------------------------------------------------------------------
# Parity cases: (id, n, c_in, (h, w), c_out, (kh, kw), stride, padding, dilation, groups,
#                bias, residual, relu, x format, dtype, launcher hooks)
# ----------------------------------------------------------------------------------------------
F32, F16 = torch.float32, torch.float16
_S1, _S2, _P0, _P1, _D1, _D2 = (1, 1), (2, 2), (0, 0), (1, 1), (1, 1), (2, 2)
K1, K3, K7 = (1, 1), (3, 3), (7, 7)
CASES = [
    # 3x3 tap loop (C_in/groups = 16)
    ("3x3_nhwc_f32", 2, 16, (9, 9), 16, K3, _S1, _P1, _D1, 1, True, True, True, CL, F32, {}),
    ("3x3_nchw_f16", 2, 16, (9, 9), 16, K3, _S1, _P1, _D1, 1, True, True, True, CF, F16, {}),
    ("3x3s2_nchw_f32", 2, 16, (9, 9), 16, K3, _S2, _P1, _D1, 1, True, False, True, CF, F32, {}),
    ("3x3s2_nhwc_f16_res", 2, 16, (9, 9), 16, K3, _S2, _P1, _D1, 1, True, True, False, CL, F16,
     {}),
    ("3x3_odd_17x11_s2_cout24", 1, 16, (17, 11), 24, K3, _S2, _P1, _D1, 1, True, True, True, CL,
     F32, {}),
    ("3x3_cin24_tail_f16", 1, 24, (7, 7), 16, K3, _S1, _P1, _D1, 1, True, False, True, CF, F16,
     {}),
    ("3x3_pad3", 1, 16, (5, 5), 16, K3, _S1, (3, 3), _D1, 1, True, True, True, CL, F32, {}),
    ("3x3_plain_conv", 2, 16, (9, 9), 16, K3, _S1, _P1, _D1, 1, False, False, False, CF, F32, {}),
    ("3x3_dil2", 2, 16, (9, 9), 16, K3, _S1, _D2, _D2, 1, True, True, True, CL, F32, {}),
    # 1x1
    ("1x1_nhwc_f16_res", 2, 16, (9, 9), 16, K1, _S1, _P0, _D1, 1, True, True, True, CL, F16, {}),
    ("1x1s2_down_nchw_f32", 2, 16, (9, 9), 32, K1, _S2, _P0, _D1, 1, True, False, False, CF, F32,
     {}),
    # stem / small C_in: flat-K loop
    ("7x7s2_stem_nhwc_f16", 1, 3, (17, 17), 16, K7, _S2, (3, 3), _D1, 1, True, False, True, CL,
     F16, {}),
    ("7x7s2_stem_nchw_f32", 1, 3, (17, 17), 16, K7, _S2, (3, 3), _D1, 1, True, False, True, CF,
     F32, {}),
    ("3x3_cin7_nchw_f32_res", 2, 7, (9, 9), 16, K3, _S1, _P1, _D1, 1, True, True, True, CF, F32,
     {}),
    ("3x3_cin7_p0_nhwc_f16_nobias", 2, 7, (9, 9), 16, K3, _S1, _P0, _D1, 1, False, False, True,
     CL, F16, {}),
    ("3x3_cin7_s2_dil2_nchw_f16", 2, 7, (9, 9), 16, K3, _S2, _P0, _D2, 1, True, True, False, CF,
     F16, {}),
    ("1x3_asym_s21_p10_cin7", 1, 7, (9, 8), 16, (1, 3), (2, 1), (1, 0), _D1, 1, True, True,
     True, CL, F32, {}),
    # groups
    ("groups2_cin8_flat_nhwc", 2, 16, (9, 9), 16, K3, _S1, _P1, _D1, 2, True, True, True, CL, F32,
     {}),
    ("groups2_cin16_tap_nchw_f16", 1, 32, (7, 7), 32, K3, _S1, _P1, _D1, 2, True, True, True, CF,
     F16, {}),
    ("groups4_cout_not_pow2", 1, 16, (7, 7), 12, K3, _S2, _P1, _D1, 4, True, False, True, CL, F32,
     {}),
    ("depthwise_nhwc_f32", 2, 16, (9, 9), 16, K3, _S1, _P1, _D1, 16, True, True, True, CL, F32,
     {}),
    ("depthwise_s2_nchw_f16", 2, 16, (9, 9), 16, K3, _S2, _P1, _D1, 16, True, False, True, CF,
     F16, {}),
    ("depthwise_mult2_dil2", 1, 8, (9, 9), 16, K3, _S1, _D2, _D2, 8, False, True, False, CL, F32,
     {}),
    ("depthwise_as_gemm", 1, 16, (7, 7), 16, K3, _S1, _P1, _D1, 16, True, True, True, CL, F32,
     {"k_flat": True}),
    # empty batch
    ("batch0_nhwc_f32", 0, 16, (9, 9), 16, K3, _S1, _P1, _D1, 1, True, True, True, CL, F32, {}),
    ("batch0_nchw_f16", 0, 3, (9, 9), 16, K7, _S2, (3, 3), _D1, 1, True, False, True, CF, F16,
     {}),
    # forced variants: the other K loop, int64 indexing, tiles with a split epilogue / swizzle
    ("force_flat_cin16", 1, 16, (7, 7), 16, K3, _S1, _P1, _D1, 1, True, True, True, CL, F32,
     {"k_flat": True}),
    ("force_tap_cin3", 1, 3, (9, 9), 16, K3, _S2, _P1, _D1, 1, True, False, True, CF, F16,
     {"k_flat": False}),
    ("int64_tap", 1, 16, (7, 7), 16, K3, _S1, _P1, _D1, 1, True, True, True, CL, F32,
     {"index_64": True}),
    ("int64_flat_f16", 1, 7, (7, 7), 16, K3, _S2, _P1, _D1, 1, True, True, True, CF, F16,
     {"index_64": True}),
    ("int64_depthwise", 1, 16, (7, 7), 16, K3, _S1, _P1, _D1, 16, True, True, True, CL, F32,
     {"index_64": True}),
    ("epi_split2", 1, 16, (7, 7), 32, K1, _S1, _P0, _D1, 1, True, True, True, CL, F32,
     {"config": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, EPI_SPLIT=2)}),
    ("epi_split4_cout48", 1, 16, (7, 7), 48, K1, _S1, _P0, _D1, 1, True, True, True, CF, F16,
     {"config": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=1, EPI_SPLIT=4)}),
    ("swizzle_groupm4", 2, 16, (9, 9), 48, K1, _S1, _P0, _D1, 1, True, True, True, CL, F32,
     {"config": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, EPI_SPLIT=1)}),
    ("bk32_two_chunks_tail", 1, 40, (5, 5), 16, K3, _S1, _P1, _D1, 1, True, False, True, CL, F16,
     {"config": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=1)}),
    # residual in the other memory format than x
    ("res_nhwc_x_nchw", 2, 16, (9, 9), 16, K3, _S1, _P1, _D1, 1, True, True, True, CF, F32,
     {"res_fmt": CL}),
    ("res_nchw_x_nhwc", 2, 16, (9, 9), 16, K1, _S1, _P0, _D1, 1, True, True, True, CL, F16,
     {"res_fmt": CF}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity(case):
    (_, n, c_in, hw, c_out, k, stride, padding, dilation, groups, bias, res, relu, fmt, dtype,
     hooks) = case
    hooks = dict(hooks)
    x, w, b, r = make_inputs(n, c_in, hw, c_out, k, stride, padding, dilation, groups, bias, res,
                             fmt, dtype, res_fmt=hooks.pop("res_fmt", None))
    y = launch(x, w, b, r, stride, padding, dilation, groups, relu, **hooks)
    check_parity(x, w, b, r, stride, padding, dilation, groups, relu, y)


def test_parity_noncontiguous_input_and_residual():
    """Arbitrary strides: a spatially sliced input and a transposed-view residual."""
    xb, w, b, _ = make_inputs(2, 16, (18, 9), 16, K3, _S1, _P1, _D1, 1, True, False, CL, F32)
    x = xb[:, :, ::2, :]  # (2, 16, 9, 9), neither NCHW- nor channels_last-contiguous
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    r = torch.randn(2, 16, 9, 9, dtype=F32, device=DEVICE).transpose(2, 3)
    y = launch(x, w, b, r, _S1, _P1, _D1, 1, True)
    check_parity(x, w, b, r, _S1, _P1, _D1, 1, True, y)


def test_relu_propagates_nan():
    """ReLU(NaN) = NaN, as torch.relu (a plain max would turn it into 0)."""
    x, w, b, _ = make_inputs(1, 16, (5, 5), 16, K1, _S1, _P0, _D1, 1, True, False, CL, F32)
    x[0, :, 2, 3] = float("nan")
    y = launch(x, w, b, None, _S1, _P0, _D1, 1, True)
    assert torch.isnan(y[0, :, 2, 3]).all()
    assert torch.isfinite(y[0, :, 0, 0]).all()


# ----------------------------------------------------------------------------------------------
# Memory format, dtypes, empty batch
# ----------------------------------------------------------------------------------------------
def test_float64_raises_type_error():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        launch(x, w, None, None, _S1, _P1, _D1, 1, True)


def test_empty_batch_returns_without_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel launched for an empty batch")
    monkeypatch.setattr(mod, "_conv_gemm_kernel", type("K", (), {"__getitem__": boom})())
    monkeypatch.setattr(mod, "_conv_gemm_tuned", type("K", (), {"__getitem__": boom})())
    x = torch.randn(0, 16, 9, 9, device=DEVICE).contiguous(memory_format=CL)
    w = torch.randn(32, 16, 3, 3, device=DEVICE)
    y = launch(x, w, None, None, _S2, _P1, _D1, 1, True)
    assert y.shape == (0, 32, 5, 5)


def test_int64_switch():
    """The launcher picks int64 index math only when a tensor extent nears 2^31 elements."""
    small = torch.empty(2, 16, 9, 9)
    assert not mod._needs_int64(small, small, None, small, 2 * 81)
    big = torch.empty_strided((2, 16, 1 << 14, 1 << 14), (1 << 32, 1 << 28, 1 << 14, 1),
                              device="meta")
    assert mod._needs_int64(big, small, None, small, 2 * 81)  # shapes only: nothing allocated
    assert mod._needs_int64(small, small, None, small, 1 << 30)


def test_conv_configs_prune():
    """Autotune config lists: clamped to the problem, deduplicated, valid for tl.dot."""
    stem = mod.conv_configs(False, True, 90, 3, 64, 147)
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in stem)
    tiny = mod.conv_configs(False, False, 80, 4, 4, 36)
    assert all(c.kwargs["BLOCK_N"] == 16 and c.kwargs["BLOCK_K"] == 16 for c in tiny)
    assert all(c.kwargs["BLOCK_N"] // c.kwargs["EPI_SPLIT"] >= 16 for c in tiny)
    keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in tiny]
    assert len(keys) == len(set(keys))
    big90 = mod.conv_configs(False, False, 90, 512, 512, 4608)
    assert len(big90) == len(mod.CONV_CONFIGS_SM90)
    assert len(mod.conv_configs(True, False, 80, 512, 512, 4608)) == len(mod.CONV_CONFIGS_FP32)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90 (no GPU needed)
# ----------------------------------------------------------------------------------------------
def test_aot_compile_all_configs(tmp_path):
    """Every config the autotuner can try, of every kernel, on the representative ResNet-50
    problems of aot.default_cases(), compiles for sm_80 and sm_90 in bf16 and fp16; the GEMM
    kernel uses mma.sync (sm_80) / wgmma (sm_90); nothing spills.  Runs in a subprocess without
    TRITON_INTERPRET (under the interpreter @triton.jit kernels cannot be compiled)."""
    rows = aot_compile(tmp_path, "--dtypes", "bf16,fp16", timeout=600)
    failed = [(r["case"], r["arch"], r["dtype"], r["tile"], r["error"][:300])
              for r in rows if not r["ok"]]
    assert not failed, failed
    archs = {r["arch"] for r in rows}
    assert archs == {80, 90}
    kernels = {r["kernel"] for r in rows}
    assert kernels == set(mod.KERNELS)
    no_tc = [(r["case"], r["arch"], r["dtype"], r["tile"], r["mma"]) for r in rows
             if r["kernel"] == "conv_gemm" and not r["tensor_cores"]]
    assert not no_tc, f"GEMM compiles without the arch's tensor-core MMA: {no_tc}"
    spilled = [(r["case"], r["arch"], r["dtype"], r["tile"], r["num_warps"], r["spill_stores"])
               for r in rows if r["spills"]]
    assert not spilled, f"register spills: {spilled}"


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
# (name, c_in, hw_in, c_out, k, stride, padding, residual, relu) of every distinct ResNet-50 conv
RESNET50 = [(c.name, c.c_in, c.size, c.c_out, c.kernel, c.stride, c.padding, c.epilogue == "add_relu",
             c.epilogue != "none") for c in RESNET50_CONVS]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _resnet_inputs(conv, dtype, fmt=CL, n=2):
    name, c_in, hw, c_out, k, s, p, res, relu = conv
    return make_inputs(n, c_in, (hw, hw), c_out, (k, k), (s, s), (p, p), _D1, 1, True, res, fmt,
                       dtype), (s, s), (p, p), relu


@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("conv", RESNET50, ids=[c[0] for c in RESNET50])
def test_gpu_resnet50_shapes(conv, dtype):
    """Every ResNet-50 conv at batch 2, NHWC, one fixed config per loop variant (the autotuned
    path is tested below; this sweep would otherwise autotune 24 shapes x 3 dtypes)."""
    (x, w, b, r), stride, padding, relu = _resnet_inputs(conv, dtype)
    cin_g, c_out, k = w.shape[1], w.shape[0], w.shape[2]
    arch = 10 * torch.cuda.get_device_capability()[0]
    cfgs = mod.conv_configs(dtype == F32, cin_g < mod.K_FLAT_BELOW, arch, cin_g, c_out,
                            k * k * cin_g)
    y = launch(x, w, b, r, stride, padding, _D1, 1, relu, config=cfgs[0])
    torch.cuda.synchronize()
    check_parity(x, w, b, r, stride, padding, _D1, 1, relu, y)


@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("conv_name", ["stem", "l3.conv3x3_s2", "l4.expand"])
def test_gpu_every_config(conv_name, dtype):
    """Every config the autotuner may pick gives the right answer (flat-K, tap 3x3 s2, 1x1+res)."""
    conv = next(c for c in RESNET50 if c[0] == conv_name)
    (x, w, b, r), stride, padding, relu = _resnet_inputs(conv, dtype)
    cin_g, c_out, k = w.shape[1], w.shape[0], w.shape[2]
    arch = 10 * torch.cuda.get_device_capability()[0]
    for cfg in mod.conv_configs(dtype == F32, cin_g < mod.K_FLAT_BELOW, arch, cin_g, c_out,
                                k * k * cin_g):
        y = launch(x, w, b, r, stride, padding, _D1, 1, relu, config=cfg)
        torch.cuda.synchronize()
        check_parity(x, w, b, r, stride, padding, _D1, 1, relu, y)


@gpu_only
@pytest.mark.parametrize("fmt", [CL, CF], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("conv_name", ["stem", "l2.conv3x3_s2", "l1.expand"])
def test_gpu_autotuned(conv_name, dtype, fmt):
    """The public launcher (autotuned) on a few ResNet-50 shapes, both memory formats."""
    conv = next(c for c in RESNET50 if c[0] == conv_name)
    (x, w, b, r), stride, padding, relu = _resnet_inputs(conv, dtype, fmt)
    y = launch(x, w, b, r, stride, padding, _D1, 1, relu)
    torch.cuda.synchronize()
    assert y.is_contiguous(memory_format=fmt)
    check_parity(x, w, b, r, stride, padding, _D1, 1, relu, y)


@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_depthwise_and_groups(dtype):
    for c, groups, c_out in [(64, 64, 64), (64, 32, 64), (128, 32, 128)]:
        x, w, b, r = make_inputs(2, c, (28, 28), c_out, K3, _S1, _P1, _D1, groups, True, True,
                                 CL, dtype)
        y = launch(x, w, b, r, _S1, _P1, _D1, groups, True)
        torch.cuda.synchronize()
        check_parity(x, w, b, r, _S1, _P1, _D1, groups, True, y)
