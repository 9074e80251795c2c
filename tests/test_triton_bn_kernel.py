"""Tests of the Triton BN(+add)+ReLU and add+ReLU kernels: ``resnet_fused.triton_kernels.bn_act``.

* Parity of every output (out, save_mean, save_invstd, the new running statistics) and every
  gradient (x, weight, bias, pre-activation = residual) against a float64 reference, with the
  project's bound (resnet_fused.testing.parity: at most twice PyTorch's own error in the same
  dtype, plus a few ulps).  Without a GPU these run in the Triton interpreter (TRITON_INTERPRET=1,
  set by tests/conftest.py) on tiny shapes: float32, float16 and bfloat16 (no tl.dot here, so
  bfloat16 is right in the interpreter), float32 parameters with 16-bit x, NCHW and NHWC,
  training and eval, residual and ReLU on and off, odd shapes (tests/samples.py's BN_CASES).
* Forced configurations: channel blocks with tails, several and empty first-level partials,
  chained finalize blocks, int64 lane offsets.
* Layout detection (the C == 1 / H*W == 1 / empty cases where both memory formats coincide),
  argument errors, edge cases (empty batch, one value per channel), NaN propagation.
* Ahead-of-time compilation of every config for sm_80 / sm_90 (no GPU needed): no spills.
* GPU only: every BatchNorm shape of ResNet-50 at batch 2 in bf16 / fp16 / fp32, forward and
  backward; every config on a few shapes; the autotuned path; determinism; int64 offsets.
"""
import pytest
import torch
from samples import BN_CASES, MEMORY_FORMATS, BNCase, bn_sample
from triton_support import DEVICE, aot_compile, gpu_only, require_runnable

from resnet_fused import reference
from resnet_fused.ops._layout import empty_output, output_memory_format
from resnet_fused.shapes import RESNET50_CONVS
from resnet_fused.testing import parity
from resnet_fused.triton_kernels import bn_act as mod

require_runnable(mod)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CL, CF = torch.channels_last, torch.contiguous_format
MOMENTUM, EPS = 0.1, 1e-5
NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Running the kernels, the references, the checks
# ----------------------------------------------------------------------------------------------
def poisoned_like(x):
    """An output in the memory format the ops give for x, filled with NaN: unwritten elements fail."""
    return empty_output(x, x.shape).fill_(NAN)


def run_forward(x, weight, bias, running_mean, running_var, residual, training, relu, **hooks):
    out = poisoned_like(x)
    stats = mod._forward(x, weight, bias, residual, running_mean, running_var, training, MOMENTUM,
                         EPS, relu, out, **hooks)
    return out, *stats


def run_backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu, **hooks):
    grad_x, grad_pre = poisoned_like(x), poisoned_like(x)
    grad_w, grad_b = mod._backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu,
                                   grad_x, grad_pre, **hooks)
    return grad_x, grad_w, grad_b, grad_pre


def torch_bn(tensors, training, relu, grad_out):
    """reference.bn_act and its gradients in the tensors' own dtypes: (out, updated running mean,
    updated running var, (grad x, grad weight, grad bias, grad pre-activation)).  A zero residual
    stands in for a missing one, so that its gradient is the pre-activation's."""
    x, w, b, rm, rv, r = [t.detach().clone() if t is not None else None for t in tensors]
    r = torch.zeros_like(x) if r is None else r
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    out = reference.bn_act(x, w, b, rm, rv, r, training=training, momentum=MOMENTUM, eps=EPS,
                           relu=relu)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype)) if out.numel() else [
        torch.zeros_like(t) for t in leaves]
    return out.detach(), rm, rv, grads


def torch_stats(x, running_mean, running_var, training):
    """(save_mean, save_invstd) from PyTorch in float32 (the kernels' statistics dtype) and in
    float64 (the oracle)."""
    if training:
        same = torch.ops.aten.native_batch_norm(x.float(), None, None, None, None, True, MOMENTUM,
                                                EPS)[1:]
        x64 = x.double()
        mean = x64.mean((0, 2, 3))
        oracle = (mean, 1 / torch.sqrt(x64.var((0, 2, 3), unbiased=False) + EPS))
        return same, oracle
    same = (running_mean.float(), 1 / torch.sqrt(running_var.float() + EPS))
    return same, (running_mean.double(), 1 / torch.sqrt(running_var.double() + EPS))


def check(actual, same_dtype, oracle, what):
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    result = parity(actual, same_dtype, oracle)
    assert result.ok, f"{what} ({actual.dtype}): {result}"


def check_forward_backward(sample, training, relu, grad_out=None, bwd_configs=None, **hooks):
    """Runs the forward and backward launchers on a bn_sample and checks every output and gradient
    against the float64 reference with the parity bound.  ``hooks`` go to both launchers, except
    that ``bwd_configs`` (when given) replaces ``configs`` for the backward.  Returns the kernel
    outputs."""
    x, weight, bias, running_mean, running_var, residual = sample
    inputs_before = [t.clone() for t in sample if t is not None]
    out, save_mean, save_invstd, new_rm, new_rv = run_forward(
        x, weight, bias, running_mean, running_var, residual, training, relu, **hooks)
    # Never in place.
    for before, now in zip(inputs_before, [t for t in sample if t is not None]):
        assert torch.equal(before, now) or (before.numel() == 0), "an input was modified"

    if grad_out is None:
        grad_out = torch.randn(x.shape, dtype=torch.float64).to(x.device, x.dtype)
        grad_out = grad_out.contiguous(memory_format=output_memory_format(x))
    bwd_hooks = dict(hooks, configs=bwd_configs) if bwd_configs is not None else hooks
    grads = run_backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu,
                         **bwd_hooks)

    same = torch_bn(sample, training, relu, grad_out)
    oracle = torch_bn([t.double() if t is not None else None for t in sample], training, relu,
                      grad_out.double())
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=output_memory_format(x))
    check(out, same[0], oracle[0], "out")

    # Statistics: float32, batch statistics (training) or running ones (eval).
    assert save_mean.dtype == F32 and save_invstd.dtype == F32
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if training and count == 0:
        assert torch.equal(save_mean, torch.zeros_like(save_mean))
        assert torch.equal(save_invstd, torch.zeros_like(save_invstd))
    else:
        (s_mean, s_invstd), (o_mean, o_invstd) = torch_stats(x, running_mean, running_var, training)
        if training:
            check(save_mean, s_mean, o_mean, "save_mean")
        else:
            assert torch.equal(save_mean, running_mean.float()), "eval save_mean is the running mean"
        check(save_invstd, s_invstd, o_invstd, "save_invstd")
    # Running statistics: new tensors in the running statistics' dtype; copies unless training.
    for actual, s, o, given, name in ((new_rm, same[1], oracle[1], running_mean, "running_mean"),
                                      (new_rv, same[2], oracle[2], running_var, "running_var")):
        assert actual.dtype == given.dtype and actual.data_ptr() != given.data_ptr()
        if training and count > 0:
            check(actual, s, o, name)
        else:
            assert torch.equal(actual, given), f"{name} must be an unchanged copy"

    for name, a, s, o in zip(["grad x", "grad weight", "grad bias", "grad pre-activation"], grads,
                             same[3], oracle[3]):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype}, expected {s.dtype}"
        check(a, s, o, name)
    return out, save_mean, save_invstd, new_rm, new_rv, grads


# ----------------------------------------------------------------------------------------------
# Parity on samples.BN_CASES (interpreter on CPU, or GPU)
# ----------------------------------------------------------------------------------------------
# (x dtype, parameter dtype): fp32; fp32 parameters with a 16-bit x (autocast); 16-bit parameters.
DTYPES = [(F32, F32), (BF16, F32), (F16, F32), (BF16, BF16), (F16, F16)]
DTYPE_IDS = ["f32", "bf16-f32params", "f16-f32params", "bf16", "f16"]
# The interpreter is slow: every case in fp32 and with bf16 x / fp32 parameters (both formats,
# both modes), the other dtype pairs on a subset.
_FULL = {"f32", "bf16-f32params"}
_SUBSET = {"odd_7ch_17x17", "no_residual", "batch0"}


def _parity_params():
    for case in BN_CASES:
        for dtypes, did in zip(DTYPES, DTYPE_IDS):
            if did not in _FULL and case.name not in _SUBSET:
                continue
            for fmt in MEMORY_FORMATS:
                for training in (True, False):
                    yield pytest.param(case, dtypes, fmt, training,
                                       id=f"{case.name}-{did}-{fmt}-{'train' if training else 'eval'}")


@pytest.mark.parametrize("case,dtypes,memory_format,training", list(_parity_params()))
def test_parity(case, dtypes, memory_format, training):
    dtype, param_dtype = dtypes
    if training and case.shape[0] * case.shape[2] * case.shape[3] == 1:
        pytest.skip("one value per channel cannot train")
    sample = bn_sample(case, dtype, DEVICE, memory_format, param_dtype=param_dtype)
    out = check_forward_backward(sample, training, case.relu)[0]
    assert out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])


# ----------------------------------------------------------------------------------------------
# Forced configurations: both reduction levels, channel tails, int64 lane offsets
# ----------------------------------------------------------------------------------------------
def _cfg(block_r, block_c, split=4, unroll=1):
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "SPLIT": split, "UNROLL": unroll}


FORCED = [
    # (id, shape, memory format, hooks)
    ("nhwc_c7_blockc2_p3", (2, 7, 5, 3), "nhwc",
     dict(configs={"reduce": _cfg(8, 2, unroll=2), "apply": {"BLOCK_R": 4, "BLOCK_C": 4},
                   "finalize": {"BLOCK_P": 2, "BLOCK_C": 2}}, partials=3)),
    ("nchw_c7_blockr4_p5", (3, 7, 3, 3), "nchw",
     dict(configs={"reduce": _cfg(4, 2), "apply": {"BLOCK_R": 8, "BLOCK_C": 4},
                   "finalize": {"BLOCK_P": 2, "BLOCK_C": 4}}, partials=5)),
    # more partials than tiles: some programs reduce nothing (count 0 partials)
    ("empty_partials", (2, 5, 3, 3), "nhwc",
     dict(configs={"reduce": _cfg(16, 8, unroll=2), "finalize": {"BLOCK_P": 4, "BLOCK_C": 8}},
          partials=7)),
    ("one_partial_one_tile", (2, 3, 4, 4), "nchw",
     dict(configs={"reduce": _cfg(16, 4), "apply": {"BLOCK_R": 16, "BLOCK_C": 4}}, partials=1)),
    ("int64_nhwc", (2, 6, 3, 5), "nhwc", dict(index_64=True)),
    ("int64_nchw", (2, 6, 3, 5), "nchw", dict(index_64=True)),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("forced", FORCED, ids=[f[0] for f in FORCED])
def test_forced_configs(forced, training):
    _, shape, fmt, hooks = forced
    sample = bn_sample(BNCase("forced", shape), F32, DEVICE, fmt)
    check_forward_backward(sample, training, relu=True, **hooks)


GPU_CONFIG_SHAPES = [
    # (id, shape, memory format, x dtype): C = 80 is 64 + a tail; 12x12 planes are 16-aligned, 7x7
    # ones are not (capped tiles)
    ("nhwc_c80_bf16", (2, 80, 6, 6), "nhwc", BF16),
    ("nhwc_c80_f32", (2, 80, 6, 6), "nhwc", F32),
    ("nchw_12x12_bf16", (2, 24, 12, 12), "nchw", BF16),
    ("nchw_7x7_f32", (2, 40, 7, 7), "nchw", F32),
]


@pytest.mark.parametrize("case", GPU_CONFIG_SHAPES, ids=[g[0] for g in GPU_CONFIG_SHAPES])
def test_gpu_config_lists(case):
    """Every config of the GPU lists (whatever mode this runs in: in the interpreter, the GPU
    tiles on CPU tensors), forward and backward, on shapes with channel and row tails."""
    _, shape, fmt, dtype = case
    sample = bn_sample(BNCase("cfg", shape), dtype, DEVICE, fmt,
                       param_dtype=F32)
    view = mod._channel_view(sample[0])
    size = sample[0].element_size()

    def configs(specs, reduce):
        return [mod._config_from_spec(spec, view.channels_last, view.rows, view.channels, reduce,
                                      size) for spec in specs]

    cl = view.channels_last
    stats = configs(mod.STATS_SPECS_NHWC if cl else mod.STATS_SPECS_NCHW, True)
    bwd = configs(mod.BWD_SPECS_NHWC if cl else mod.BWD_SPECS_NCHW, True)
    apply = configs(mod.APPLY_SPECS_NHWC if cl else mod.APPLY_SPECS_NCHW, False)
    for i in range(max(len(stats), len(bwd), len(apply))):
        check_forward_backward(
            sample, True, True,
            configs={"reduce": stats[i % len(stats)], "apply": apply[i % len(apply)],
                     "finalize": mod.FINALIZE_CONFIG},
            bwd_configs={"reduce": bwd[i % len(bwd)], "apply": apply[(i + 1) % len(apply)],
                         "finalize": mod.FINALIZE_CONFIG})


def test_statistics_of_large_mean_small_variance():
    """Welford/Chan statistics: a channel with |mean| >> std keeps its variance (E[x^2] - E[x]^2 in
    fp32 would lose it entirely here: the square of the mean carries ~1e-7 relative error)."""
    g = torch.Generator().manual_seed(1)
    x64 = 1000 + 1e-2 * torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    x = x64.float().to(DEVICE).contiguous(memory_format=CL)
    ones, zeros = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    _, save_mean, save_invstd, _, new_rv = run_forward(
        x, ones, zeros, zeros, ones, None, True, False,
        configs={"reduce": _cfg(8, 4)}, partials=3)
    var = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(save_invstd.double(), 1 / torch.sqrt(var + EPS), rtol=1e-4, atol=0)
    torch.testing.assert_close(new_rv.double(), 0.9 + 0.1 * x.double().var((0, 2, 3)), rtol=1e-4,
                               atol=0)


# ----------------------------------------------------------------------------------------------
# Layout detection and errors
# ----------------------------------------------------------------------------------------------
AMBIGUOUS = [
    ("c1_nchw", (3, 1, 4, 5), CF, CF),
    ("c1_x_nhwc_out_nchw", (3, 1, 4, 5), CL, CF),
    ("hw1_nchw", (6, 5, 1, 1), CF, CF),
    ("hw1_x_nhwc_out_nchw", (6, 5, 1, 1), CL, CF),
    ("batch1_nhwc", (1, 3, 4, 6), CL, CL),
    ("h1_nchw", (2, 3, 1, 5), CF, CF),
    ("w1_nhwc", (2, 3, 5, 1), CL, CL),
]


@pytest.mark.parametrize("case", AMBIGUOUS, ids=[a[0] for a in AMBIGUOUS])
def test_layouts_where_formats_coincide(case):
    """Sizes where NCHW and channels_last store the same offsets take the (M, C) matrix view; the
    residual may then come in either format."""
    _, shape, x_fmt, r_fmt = case
    sample = list(bn_sample(BNCase("layout", shape), F32, DEVICE, "nchw"))
    sample[0] = sample[0].contiguous(memory_format=x_fmt)
    sample[5] = sample[5].contiguous(memory_format=r_fmt)
    check_forward_backward(sample, True, relu=True)


def test_view_choice():
    x = torch.empty(2, 3, 4, 5)
    assert not mod._channel_view(x).channels_last
    v = mod._channel_view(x.contiguous(memory_format=CL))
    assert v.channels_last and (v.rows, v.channels, v.stride_r, v.stride_c) == (40, 3, 3, 1)
    assert mod._channel_view(torch.empty(2, 1, 4, 5)).channels_last
    assert mod._channel_view(torch.empty(2, 3, 1, 1)).channels_last
    assert mod._channel_view(torch.empty(0, 3, 4, 5)).channels_last
    v = mod._channel_view(x)
    assert (v.n_outer, v.rows, v.stride_o, v.stride_r, v.stride_c) == (2, 20, 60, 1, 20)
    assert not v.index_64
    big = torch.empty_strided((2, 16, 1 << 14, 1 << 14), (1 << 32, 1 << 28, 1 << 14, 1),
                              device="meta")
    assert mod._channel_view(big).index_64


def test_mixed_memory_formats_raise():
    x, w, b, rm, rv, r = bn_sample(BNCase("mixed", (2, 4, 3, 3)), F32, DEVICE, "nhwc")
    with pytest.raises(ValueError, match="residual must have x's shape and memory format"):
        mod.bn_act_forward(x, w, b, r.contiguous(), rm, rv, True, MOMENTUM, EPS, True,
                           poisoned_like(x))
    with pytest.raises(ValueError, match="out must have"):
        mod.bn_act_forward(x, w, b, r, rm, rv, True, MOMENTUM, EPS, True, torch.empty(x.shape))
    with pytest.raises(ValueError, match="NCHW- or channels_last-contiguous"):
        mod.bn_act_forward(x[:, :, :2], w, b, None, rm, rv, True, MOMENTUM, EPS, True,
                           torch.empty(2, 4, 2, 3))


def test_float64_raises_type_error():
    x, w, b, rm, rv, r = bn_sample(BNCase("f64", (2, 3, 2, 2)), torch.float64, DEVICE)
    with pytest.raises(TypeError, match="float64"):
        mod.bn_act_forward(x, w, b, r, rm, rv, True, MOMENTUM, EPS, True, torch.empty_like(x))
    with pytest.raises(TypeError, match="float64"):
        mod.bn_act_backward(x, x, x, w, rm, rv, True, True, torch.empty_like(x),
                            torch.empty_like(x))
    with pytest.raises(TypeError, match="float64"):
        mod.add_act(x, r, True, torch.empty_like(x))


def test_training_with_one_value_per_channel_raises():
    x, w, b, rm, rv, _ = bn_sample(BNCase("one", (1, 3, 1, 1)), F32, DEVICE)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mod.bn_act_forward(x, w, b, None, rm, rv, True, MOMENTUM, EPS, True, torch.empty_like(x))


def test_eval_empty_batch_statistics():
    x, w, b, rm, rv, r = bn_sample(BNCase("empty", (0, 5, 3, 3)), BF16, DEVICE, "nhwc",
                                   param_dtype=F32)
    out, save_mean, save_invstd, new_rm, new_rv = run_forward(x, w, b, rm, rv, r, False, True)
    assert out.shape == x.shape
    assert torch.equal(save_mean, rm) and torch.equal(new_rm, rm) and torch.equal(new_rv, rv)
    torch.testing.assert_close(save_invstd, 1 / torch.sqrt(rv + EPS))


def test_relu_propagates_nan():
    """ReLU(NaN) = NaN as torch.relu; in backward, g = 0 where out is NaN (not > 0)."""
    x, w, b, rm, rv, _ = bn_sample(BNCase("nan", (2, 4, 3, 3)), F32, DEVICE, "nhwc")
    x[1, 2, 0, 1] = NAN
    out, save_mean, save_invstd, _, _ = run_forward(x, w, b, rm, rv, None, False, True)
    assert torch.isnan(out[1, 2, 0, 1]) and torch.isnan(out).sum() == 1
    grad_x, _, _, grad_pre = run_backward(torch.ones_like(out), out, x, w, save_mean, save_invstd,
                                          False, True)
    assert grad_pre[1, 2, 0, 1] == 0 and not torch.isnan(grad_x).any()


def test_deterministic_repeat():
    """Bitwise-equal results run to run (here in the interpreter; on the GPU below)."""
    x, w, b, rm, rv, r = bn_sample(BN_CASES[1], BF16, DEVICE, "nhwc", param_dtype=F32)
    grad_out = torch.randn(x.shape, device=DEVICE).to(x.dtype).contiguous(memory_format=CL)
    runs = []
    for _ in range(2):
        fwd = run_forward(x, w, b, rm, rv, r, True, True)
        runs.append(fwd + run_backward(grad_out, fwd[0], x, w, fwd[1], fwd[2], True, True))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


# ----------------------------------------------------------------------------------------------
# add_act
# ----------------------------------------------------------------------------------------------
ADD_CASES = [
    ("nchw_f32", (2, 7, 17, 17), CF, F32, True),
    ("nhwc_bf16", (2, 7, 17, 17), CL, BF16, True),
    ("nhwc_f16_norelu", (1, 3, 5, 5), CL, F16, False),
    ("2d_f32", (37, 11), None, F32, True),
    ("empty", (0, 4, 3, 3), CL, F32, True),
]


@pytest.mark.parametrize("case", ADD_CASES, ids=[c[0] for c in ADD_CASES])
def test_add_act_parity(case):
    _, shape, fmt, dtype, relu = case
    g = torch.Generator().manual_seed(0)

    def make():
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
        return t.contiguous(memory_format=fmt) if fmt is not None else t

    x, r = make(), make()
    out = torch.full_like(x, NAN)
    assert mod.add_act(x, r, relu, out) is out
    assert out.is_contiguous(memory_format=fmt or CF)
    check(out, reference.add_act(x, r, relu), reference.add_act(x.double(), r.double(), relu),
          "add_act")


def test_add_act_mixed_formats_raise():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="residual must have"):
        mod.add_act(x, x.contiguous(memory_format=CL), True, torch.empty_like(x))


# ----------------------------------------------------------------------------------------------
# Config lists (the GPU lists, whatever mode this runs in)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("rows,channels", [(25088, 64), (49, 2048), (6, 7), (1, 3), (3, 1)])
def test_config_clamping(channels_last, rows, channels, elem_size):
    aligned = (channels if channels_last else rows) % 16 == 0
    for specs, reduce in ((mod.STATS_SPECS_NHWC, True), (mod.STATS_SPECS_NCHW, True),
                          (mod.BWD_SPECS_NHWC, True), (mod.BWD_SPECS_NCHW, True),
                          (mod.APPLY_SPECS_NHWC, False), (mod.APPLY_SPECS_NCHW, False)):
        for spec in specs:
            c = mod._config_from_spec(spec, channels_last, rows, channels, reduce, elem_size)
            br, bc, warps = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"], c.num_warps
            assert br & (br - 1) == 0 and bc & (bc - 1) == 0, "blocks must be powers of 2"
            assert br <= mod._next_pow2(rows) and bc <= mod._next_pow2(channels)
            assert br * bc * elem_size <= spec.tile * 2 and warps >= 1
            assert warps == 1 or br * bc >= 256 * warps
            if not aligned:  # no vector loads: at most 8 elements per thread
                assert br * bc <= 8 * 32 * spec.warps
            assert ("SPLIT" in c.kwargs and "UNROLL" in c.kwargs) == reduce


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90 (no GPU needed)
# ----------------------------------------------------------------------------------------------
def test_aot_compile_all_configs(tmp_path):
    """Every config of every kernel in bn_act.KERNELS, on the representative problems of
    aot.bn_cases() (ResNet-50 shapes, NHWC and NCHW, every kernel variant), compiles for sm_80 and
    sm_90 in bf16, fp16 and fp32 without spilling.  Runs in a subprocess without
    TRITON_INTERPRET (under the interpreter @triton.jit kernels cannot be compiled)."""
    rows = aot_compile(tmp_path, "--family", "bn", timeout=900)
    failed = [(r["kernel"], r["case"], r["arch"], r["dtype"], r["tile"], r["error"][:300])
              for r in rows if not r["ok"]]
    assert not failed, failed
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    assert {r["kernel"] for r in rows} == set(mod.KERNELS)
    spilled = [(r["kernel"], r["case"], r["arch"], r["dtype"], r["tile"], r["num_warps"],
                r.get("spill_stores")) for r in rows if r["spills"]]
    assert not spilled, f"register spills: {spilled}"


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
def _resnet50_bn_shapes():
    """(name, C, H=W, residual, relu) of every distinct BatchNorm of ResNet-50 (the BN after each
    conv: its output channels and size, and the conv's epilogue)."""
    seen, out = set(), []
    for conv in RESNET50_CONVS:
        key = (conv.c_out, conv.output_size(), conv.epilogue)
        if key not in seen:
            seen.add(key)
            out.append((f"{conv.name}_c{conv.c_out}_{conv.output_size()}", conv.c_out,
                        conv.output_size(), conv.epilogue == "add_relu", conv.epilogue != "none"))
    return out


RESNET50_BN = _resnet50_bn_shapes()
GPU_DTYPES = [(BF16, F32), (F16, F32), (F32, F32)]
GPU_DTYPE_IDS = ["bf16", "f16", "f32"]


def _gpu_sample(shape, dtypes, fmt, n=2):
    name, c, hw, res, relu = shape
    case = BNCase(name, (n, c, hw, hw), residual=res, relu=relu)
    return bn_sample(case, dtypes[0], "cuda", fmt, param_dtype=dtypes[1]), relu


@gpu_only
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtypes", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("shape", RESNET50_BN, ids=[s[0] for s in RESNET50_BN])
def test_gpu_resnet50_shapes(shape, dtypes, training):
    """Every ResNet-50 BN shape at batch 2, NHWC, the first config of each list (the autotuned
    path is tested below), forward and backward."""
    sample, relu = _gpu_sample(shape, dtypes, "nhwc")
    x = sample[0]
    view = mod._channel_view(x)
    args = (True, view.rows, view.channels, x.element_size())
    apply = mod.bn_configs("apply", *args)[0]
    check_forward_backward(sample, training, relu,
                           configs={"reduce": mod.bn_configs("stats", *args)[0], "apply": apply},
                           bwd_configs={"reduce": mod.bn_configs("bwd_reduce", *args)[0],
                                        "apply": apply})


@gpu_only
@pytest.mark.parametrize("fmt", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtypes", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("shape_name", ["stem_c64_112", "l1.expand_c256_56", "l3.conv3x3_s2_c256_14",
                                        "l4.expand_c2048_7"])
def test_gpu_every_config(shape_name, dtypes, fmt):
    """Every config the autotuner may pick gives the right answer, in both memory formats."""
    shape = next(s for s in RESNET50_BN if s[0] == shape_name)
    sample, relu = _gpu_sample(shape, dtypes, fmt)
    view = mod._channel_view(sample[0])
    args = (view.channels_last, view.rows, view.channels, sample[0].element_size())
    stats, bwd, apply = (mod.bn_configs(kind, *args) for kind in ("stats", "bwd_reduce", "apply"))
    for i in range(max(len(stats), len(bwd), len(apply))):
        check_forward_backward(
            sample, True, relu,
            configs={"reduce": stats[i % len(stats)], "apply": apply[i % len(apply)]},
            bwd_configs={"reduce": bwd[i % len(bwd)], "apply": apply[(i + 1) % len(apply)]})


@gpu_only
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtypes", GPU_DTYPES, ids=GPU_DTYPE_IDS)
@pytest.mark.parametrize("shape_name", ["stem_c64_112", "l2.expand_c512_28", "l4.conv3x3_s2_c512_7"])
def test_gpu_autotuned(shape_name, dtypes, fmt, training):
    """The public launchers (autotuned) on a few ResNet-50 shapes, both formats, batch 8."""
    shape = next(s for s in RESNET50_BN if s[0] == shape_name)
    sample, relu = _gpu_sample(shape, dtypes, fmt, n=8)
    check_forward_backward(sample, training, relu)


@gpu_only
def test_gpu_deterministic():
    """Bitwise-equal results run to run (no atomics; the reduction order is fixed by the config)."""
    shape = next(s for s in RESNET50_BN if s[0] == "stem_c64_112")
    sample, relu = _gpu_sample(shape, (BF16, F32), "nhwc", n=8)
    x, w = sample[0], sample[1]
    grad_out = torch.randn_like(x)
    runs = []
    for _ in range(3):
        fwd = run_forward(*sample[:5], sample[5], True, relu)
        bwd = run_backward(grad_out, fwd[0], x, w, fwd[1], fwd[2], True, relu)
        runs.append(fwd + bwd)
    for other in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0], other))


@gpu_only
def test_gpu_add_act_resnet_shapes():
    for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7)):
        for dtype in (BF16, F16, F32):
            x = torch.randn(2, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=CL)
            r = torch.randn_like(x)
            out = torch.full_like(x, NAN)
            mod.add_act(x, r, True, out)
            check(out, reference.add_act(x, r), reference.add_act(x.double(), r.double()),
                  f"add_act {c}x{hw} {dtype}")


@gpu_only
def test_gpu_int64_offsets():
    """A tensor of more than 2^31 elements (bf16, NHWC, 4.3 GB): statistics against PyTorch in
    fp32 and the elements past 2^31 against the formula."""
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs about 40 GB of GPU memory")
    n, c, h, w = 2, 64, 4096, 4100  # 2.15e9 elements
    x = torch.randn(n, c, h, w, device="cuda", dtype=BF16, memory_format=CL)
    assert x.numel() > 2**31
    ones, zeros = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    out = torch.empty_like(x)
    save_mean, save_invstd, _, _ = mod.bn_act_forward(x, ones, zeros, None, zeros, ones, True,
                                                      MOMENTUM, EPS, False, out)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    mean = torch.stack([rows[i:i + 2**22].double().sum(0) for i in range(0, rows.shape[0], 2**22)]
                       ).sum(0) / rows.shape[0]
    torch.testing.assert_close(save_mean.double(), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(save_invstd, torch.ones_like(save_invstd), rtol=1e-2, atol=0)
    tail = rows[-1000:].float()
    expected = ((tail - save_mean) * save_invstd).to(BF16)
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, c)[-1000:], expected,
                               rtol=1e-2, atol=1e-2)
