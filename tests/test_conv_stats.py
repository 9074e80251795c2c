"""rf.conv_stats on every backend against a float64 reference: forward, gradients from all three outputs,
gradcheck, opcheck, torch.compile, the padding rule, the statistics' accuracy and determinism, bad input, and
the Triton kernels' ahead-of-time compile. The Triton backend runs in the interpreter without a GPU (tiny
shapes; fp32 and fp16 only, see ENV.md)."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from samples import MEMORY_FORMATS, ConvGeometry, assert_parity, skip_unless_runs, to_float64
from triton_support import aot_compile, gpu_only

import resnet_fused as rf
from resnet_fused import reference

BACKENDS = ["reference", "cpu", "triton"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class StatsCase(ConvGeometry):
    """A conv_stats case: the geometry, with or without the BN + ReLU prologue."""
    prologue: bool = True
    relu: bool = True


# Tiny on purpose (the interpreter); odd channel counts, batch 1, 2x2 images, every conv geometry.
CASES = [
    StatsCase("3x3", 2, 8, (6, 6), 8, 3, padding=1),
    StatsCase("odd_7ch_9x9", 1, 7, (9, 9), 5, 3, padding=1),
    StatsCase("stride2", 2, 6, (7, 9), 12, 3, stride=2, padding=1),
    StatsCase("1x1", 2, 16, (5, 5), 24, 1),
    StatsCase("1x1_stride2", 2, 16, (6, 6), 8, 1, stride=2),
    StatsCase("stem_7x7", 1, 3, (12, 12), 8, 7, stride=2, padding=3, prologue=False),
    StatsCase("dilation2", 1, 4, (8, 8), 4, 3, padding=2, dilation=2),
    StatsCase("groups2", 2, 8, (5, 5), 6, 3, padding=1, groups=2),
    StatsCase("depthwise", 1, 6, (6, 6), 6, 3, padding=1, groups=6),
    StatsCase("no_relu", 2, 5, (5, 5), 7, 3, padding=1, relu=False),
    StatsCase("no_prologue", 2, 5, (5, 5), 3, 3, padding=1, prologue=False),
    StatsCase("batch1_2x2", 1, 5, (2, 2), 3, 3, padding=1),
]
IDS = [c.name for c in CASES]


def sample(case: StatsCase, dtype=torch.float32, device="cpu", memory_format="nchw", requires_grad=False):
    """(x, weight, scale, shift), kwargs. x has a nonzero mean and shift is positive on average, so the
    statistics and the padding rule are exercised; scale/shift are float32 for a 16-bit x, as the blocks
    give them (a BN's parameters under autocast)."""
    fmt = MEMORY_FORMATS[memory_format]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def make(t, dt):
        return t.to(dtype=dt, device=device).requires_grad_(requires_grad)

    fan_in = case.c_in // case.groups * case.kernel**2
    x = make((torch.randn(case.n, case.c_in, *case.hw, dtype=torch.float64) + 0.5).contiguous(memory_format=fmt),
             dtype)
    weight = make(torch.randn(case.c_out, case.c_in // case.groups, case.kernel, case.kernel,
                              dtype=torch.float64) * fan_in**-0.5, dtype)
    scale = shift = None
    if case.prologue:
        scale = make(torch.rand(case.c_in, dtype=torch.float64) + 0.5, param_dtype)
        shift = make(torch.randn(case.c_in, dtype=torch.float64) * 0.5 + 0.3, param_dtype)
    kwargs = dict(relu=case.relu, stride=case.stride, padding=case.padding, dilation=case.dilation,
                  groups=case.groups)
    return (x, weight, scale, shift), kwargs


def eager_same_dtype(x, weight, scale, shift, relu, stride, padding, dilation, groups):
    """What eager PyTorch computes in x's dtype (BN apply + ReLU, conv, then BN's statistics of the rounded
    conv output in float32): the error every backend is bounded by."""
    z = x
    if scale is not None:
        z = x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)
        z = F.relu(z) if relu else z
    y = F.conv2d(z, weight, None, stride, padding, dilation, groups)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0)
    return y, mean, var


def oracle(args, kwargs):
    """The float64 result of the op's contract. For a 16-bit x, z is x's dtype by contract (the prologue's
    fp32 result is rounded to it, as the kernels load it into tl.dot), so that rounding is part of the oracle;
    with a handful of pixels per channel it can outweigh everything else in the statistics."""
    x, weight, scale, shift = args
    if scale is not None and x.dtype in (torch.float16, torch.bfloat16):
        shape = (1, -1, 1, 1)
        z = x.detach().float() * scale.detach().reshape(shape) + shift.detach().reshape(shape)
        z = (F.relu(z) if kwargs["relu"] else z).to(x.dtype)
        return reference.conv_stats(*to_float64([z, weight]), **_positional(kwargs))
    return reference.conv_stats(*to_float64(args), **_positional(kwargs))


def _positional(kwargs):
    return dict(stride=kwargs["stride"], padding=kwargs["padding"], dilation=kwargs["dilation"],
                groups=kwargs["groups"], relu=kwargs["relu"])


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_parity(case, backend, dtype, memory_format, device):
    skip_unless_runs("conv_stats", backend, device, dtype)
    args, kwargs = sample(case, dtype, device, memory_format)
    y, mean, var = rf.conv_stats(*args, **kwargs, backend=backend)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == stats_dtype and var.dtype == stats_dtype
    assert y.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])
    same = eager_same_dtype(*args, **kwargs)
    for name, a, t, o in zip(("y", "mean", "var"), (y, mean, var), same, oracle(args, kwargs)):
        assert_parity(a, t, o, what=name)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_parity(case, backend, memory_format, device):
    """Gradients of x, weight, scale and shift with gradients flowing in from y, mean and var."""
    skip_unless_runs("conv_stats", backend, device, torch.float32)
    args, kwargs = sample(case, torch.float32, device, memory_format, requires_grad=True)
    oracle_args = to_float64(args)
    outs64 = reference.conv_stats(*oracle_args, **_positional(kwargs))
    grads = [torch.randn_like(t) for t in outs64]
    inputs = [t for t in args if t is not None]
    oracle_inputs = [t for t in oracle_args if t is not None]

    def loss(outs, gs):
        return sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, gs))

    actual = torch.autograd.grad(loss(rf.conv_stats(*args, **kwargs, backend=backend), grads), inputs)
    same = torch.autograd.grad(loss(reference.conv_stats(*args, **_positional(kwargs)), grads), inputs)
    expected = torch.autograd.grad(loss(outs64, grads), oracle_inputs)
    for name, a, t, o in zip(("x", "weight", "scale", "shift"), actual, same, expected):
        assert_parity(a, t, o, what=f"grad of {name}")
    assert actual[0].is_contiguous(memory_format=MEMORY_FORMATS[memory_format])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("3x3", "stride2", "groups2", "no_relu", "1x1")],
                         ids=lambda c: c.name)
def test_gradcheck_float64(case, backend):
    skip_unless_runs("conv_stats", backend, "cpu", torch.float64)
    args, kwargs = sample(case, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: rf.conv_stats(*a, **kwargs, backend=backend), args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_without_prologue(backend):
    skip_unless_runs("conv_stats", backend, "cpu", torch.float64)
    args, kwargs = sample(CASES[0], torch.float64, requires_grad=True)
    x, weight = args[:2]
    assert torch.autograd.gradcheck(lambda a, b: rf.conv_stats(a, b, **kwargs, backend=backend), (x, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_contributes_zero(backend, device):
    """Padded positions of z are 0, not relu(shift): with a positive shift, the border outputs tell."""
    skip_unless_runs("conv_stats", backend, device, torch.float32)
    x = torch.randn(1, 4, 5, 5, device=device)
    weight = torch.randn(3, 4, 3, 3, device=device)
    scale, shift = torch.rand(4, device=device) + 0.5, torch.full((4,), 2.0, device=device)
    y, mean, var = rf.conv_stats(x, weight, scale, shift, padding=1, backend=backend)
    z = F.relu(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
    expected = F.conv2d(z, weight, padding=1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, expected.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    wrong = F.conv2d(F.relu(F.pad(x, [1, 1, 1, 1]) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)), weight)
    assert (y - wrong).abs().max() > 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_accurate_with_large_mean(backend, device):
    """A mean 1e4 times the spread: E[y^2] - E[y]^2 in float32 would lose every digit of the variance."""
    skip_unless_runs("conv_stats", backend, device, torch.float32)
    x = (1000.0 + 0.1 * torch.randn(3, 16, 9, 9, dtype=torch.float64)).to(device)
    weight = (torch.rand(16, 16, 1, 1, dtype=torch.float64) / 16).to(device)
    _, mean64, var64 = reference.conv_stats(x, weight)
    _, mean, var = rf.conv_stats(x.float(), weight.float(), backend=backend)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=2e-2, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic(backend, device):
    skip_unless_runs("conv_stats", backend, device, torch.float32)
    args, kwargs = sample(CASES[2], torch.float32, device, "nhwc")
    first = rf.conv_stats(*args, **kwargs, backend=backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU kernel's partials do not depend on the thread count
    try:
        second = rf.conv_stats(*args, **kwargs, backend=backend)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom is <= 0")
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    skip_unless_runs("conv_stats", backend, device, torch.float32)
    x, weight = torch.randn(0, 4, 5, 5, device=device), torch.randn(6, 4, 3, 3, device=device)
    y, mean, var = rf.conv_stats(x, weight, torch.ones(4, device=device), torch.zeros(4, device=device),
                                 padding=1, backend=backend)
    assert y.shape == (0, 6, 5, 5) and mean.shape == var.shape == (6,)
    assert mean.isnan().all() and var.isnan().all()  # as torch.var_mean of nothing


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("op_backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7]], ids=lambda c: c.name)
def test_opcheck(case, op_backend, memory_format, requires_grad, device):
    skip_unless_runs("conv_stats", op_backend, device, torch.float32)
    (x, weight, scale, shift), kw = sample(case, torch.float32, device, memory_format, requires_grad)
    op = torch.ops.resnet_fused.conv_stats if op_backend == "cpu" else torch.ops.resnet_fused.conv_stats_triton
    pair = lambda v: [v, v]  # noqa: E731
    torch.library.opcheck(op.default, (x, weight, scale, shift, pair(kw["stride"]), pair(kw["padding"]),
                                       pair(kw["dilation"]), kw["groups"], kw["relu"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    skip_unless_runs("conv_stats", backend, device, torch.float32)
    args, kwargs = sample(CASES[2], torch.float32, device, "nhwc", requires_grad=True)

    def step(*a):
        y, mean, var = rf.conv_stats(*a, **kwargs, backend=backend)
        return y.sum() + mean.sum() + (var * 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, expected = compiled(*args), step(*args)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out, args), torch.autograd.grad(expected, args))


def test_default_backend_choice():
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    expected_cpu = "cpu" if "cpu" in rf.available_backends() else "reference"
    assert rf.backends.resolve_backend("conv_stats", None, cpu, f32) == expected_cpu
    # The Triton kernels have no recorded GPU parity run yet: CUDA tensors take the reference path.
    assert rf.backends.resolve_backend("conv_stats", None, cuda, f32) == "reference"


BAD_INPUTS = [
    # (description, change to the good call, error type, message fragment)
    ("scale without shift", lambda a: a.update(shift=None), ValueError, "scale and shift must be given together"),
    ("scale size", lambda a: a.update(scale=torch.ones(5)), ValueError, "scale must have shape (8,)"),
    ("2-d shift", lambda a: a.update(shift=torch.ones(8, 1)), ValueError, "shift must be 1-D"),
    ("channel mismatch", lambda a: a.update(x=torch.randn(2, 5, 9, 9), scale=None, shift=None), ValueError,
     "x has 5 channels"),
    ("groups mismatch", lambda a: a.update(groups=3), ValueError, "groups=3"),
    ("3-d x", lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
    ("weight dtype", lambda a: a.update(weight=a["weight"].double()), TypeError, "weight has dtype torch.float64"),
    ("scale dtype", lambda a: a.update(scale=a["scale"].double(), shift=a["shift"].double()), TypeError,
     "scale and shift have dtype torch.float64 but x has torch.float32"),
    ("scale and shift dtypes", lambda a: a.update(shift=a["shift"].half()), TypeError,
     "shift has dtype torch.float16 but scale has torch.float32"),
    ("integer x", lambda a: a.update(x=a["x"].long()), TypeError, "x must have a floating-point dtype"),
    ("mixed devices", lambda a: a.update(shift=a["shift"].to("meta")), RuntimeError, "shift is on meta"),
    ("asymmetric same padding", lambda a: a.update(weight=torch.randn(8, 8, 4, 4), padding="same"), ValueError,
     "pads asymmetrically"),
    ("negative padding", lambda a: a.update(padding=-1), ValueError, "padding must be >= 0"),
    ("unknown backend", lambda a: a.update(backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
]


@pytest.mark.parametrize("change,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(change, error, message):
    (x, weight, scale, shift), kwargs = sample(StatsCase("bad", 2, 8, (9, 9), 8, 3, padding=1))
    call = dict(x=x, weight=weight, scale=scale, shift=shift, **kwargs)
    change(call)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        rf.conv_stats(**call)


def test_triton_float64_is_refused():
    skip_unless_runs("conv_stats", "triton", "cpu", torch.float32)
    x, weight = torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(4, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' runs conv_stats on float32, float16, bfloat16"):
        rf.conv_stats(x, weight, backend="triton")


# ----------------------------------------------------------------------------------------------
# The exit of a block on conv_stats: relu(y * scale + shift + shortcut'), one pass on the triton and cpu backends
# ----------------------------------------------------------------------------------------------
def exit_sample(residual: str, dtype, memory_format, requires_grad=False):
    fmt = MEMORY_FORMATS[memory_format]

    def act():
        return torch.randn(2, 5, 4, 3, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(requires_grad)

    def param():
        return (torch.rand(5) + 0.5).requires_grad_(requires_grad)

    y, scale, shift = act(), param(), (torch.randn(5) * 0.5).requires_grad_(requires_grad)
    shortcut = None if residual == "none" else act()
    extra = (param(), (torch.randn(5) * 0.5).requires_grad_(requires_grad)) if residual == "affine" else (None, None)
    return (y, scale, shift, shortcut, *extra)


EXIT_BACKENDS = ["cpu", "triton"]
EXIT_OPS = {"cpu": "bn_add_relu", "triton": "bn_add_relu_triton"}


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("residual", ["none", "plain", "affine"])
@pytest.mark.parametrize("backend", EXIT_BACKENDS)
def test_block_exit(backend, residual, dtype, memory_format):
    skip_unless_runs("conv_stats", backend, "cpu", dtype)
    from resnet_fused.ops.conv_stats import bn_add_relu
    args = exit_sample(residual, dtype, memory_format, requires_grad=True)
    out = bn_add_relu(*args, backend=backend)
    assert out.dtype == dtype and out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])
    args64 = to_float64(args)
    expected = bn_add_relu(*args64, backend="reference")
    assert_parity(out, bn_add_relu(*args, backend="reference"), expected)
    if dtype == torch.float32:
        grad = torch.randn_like(expected)
        inputs = [t for t in args if t is not None]
        actual = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        same = torch.autograd.grad(bn_add_relu(*args, backend="reference"), inputs, grad.to(out.dtype))
        oracle_grads = torch.autograd.grad(expected, [t for t in args64 if t is not None], grad)
        for i, (a, t, o) in enumerate(zip(actual, same, oracle_grads)):
            assert_parity(a, t, o, what=f"grad {i}")


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("residual", ["none", "plain", "affine"])
@pytest.mark.parametrize("backend", EXIT_BACKENDS)
def test_opcheck_block_exit(backend, residual, requires_grad):
    skip_unless_runs("conv_stats", backend, "cpu", torch.float32)
    args = exit_sample(residual, torch.float32, "nhwc", requires_grad)
    torch.library.opcheck(getattr(torch.ops.resnet_fused, EXIT_OPS[backend]).default, args)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(y=a["y"][0]), "y must be 4-D"),
    (lambda a: a.update(scale=a["scale"][:3]), "scale must have shape [5]"),
    (lambda a: a.update(residual_shift=None), "residual_scale and residual_shift go together"),
    (lambda a: a.update(residual=None), "residual_scale and residual_shift need a residual"),
    (lambda a: a.update(residual=a["residual"][:, :, :2]), "residual must have y's shape"),
    (lambda a: a.update(residual=a["residual"].double()), "y and residual dtypes differ"),
], ids=["3-d y", "scale shape", "half an affine residual", "affine without residual", "residual shape",
        "residual dtype"])
def test_cpu_block_exit_bad_input(change, message):
    """The C++ op checks its arguments itself (the Python callers pass their own, unchecked)."""
    skip_unless_runs("conv_stats", "cpu", "cpu", torch.float32)
    call = dict(zip(["y", "scale", "shift", "residual", "residual_scale", "residual_shift"],
                    exit_sample("affine", torch.float32, "nhwc")))
    change(call)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.resnet_fused.bn_add_relu(**call)


# ----------------------------------------------------------------------------------------------
# The Triton kernel's variants, through its launcher's test hooks (interpreter or GPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks", [dict(k_flat=True), dict(k_flat=False), dict(index_64=True),
                                   dict(config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})],
                         ids=["flat_k", "tap_loop", "int64", "many_tiles"])
def test_triton_kernel_variants(hooks):
    """Both K loops, int64 index math, and enough M tiles that the combine kernel takes several steps."""
    skip_unless_runs("conv_stats", "triton", "cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    from resnet_fused.ops._layout import empty_output
    from resnet_fused.triton_kernels import conv_stats as kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = StatsCase("variants", 3, 16, (15, 15), 24, 3, padding=1)  # M = 675: 43 tiles of 16 rows
    (x, weight, scale, shift), kw = sample(case, torch.float32, device, "nhwc")
    out = empty_output(x, (3, 24, 15, 15))
    y, mean, var = kernels._launch(x, weight, scale, shift, (1, 1), (1, 1), (1, 1), 1, True, out, **hooks)
    args = (x, weight, scale, shift)
    same = eager_same_dtype(*args, **kw)
    for name, a, t, o in zip(("y", "mean", "var"), (y, mean, var), same, oracle(args, kw)):
        assert_parity(a, t, o, what=name)


def test_aot_compile_all_configs(tmp_path):
    """Every config the autotuner can try for conv_stats compiles for sm_80 and sm_90 in bf16, fp16 and fp32
    on the cases of aot.stats_cases(); 16-bit tiles use mma.sync (sm_80) / wgmma (sm_90); nothing spills."""
    rows = aot_compile(tmp_path, "--family", "stats", timeout=600)
    failed = [(r["case"], r["arch"], r["dtype"], r["tile"], r["error"][:300]) for r in rows if not r["ok"]]
    assert not failed, failed
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} == {"conv_stats", "combine_stats", "bn_add_relu"}
    no_tc = [(r["case"], r["arch"], r["dtype"], r["tile"]) for r in rows
             if r["kernel"] == "conv_stats" and r["dtype"] != "fp32" and not r["tensor_cores"]]
    assert not no_tc, f"16-bit compiles without the arch's tensor-core MMA: {no_tc}"
    spilled = [(r["case"], r["arch"], r["dtype"], r["tile"], r["spill_stores"]) for r in rows if r["spills"]]
    assert not spilled, f"register spills: {spilled}"


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 (wrong in the interpreter) and ResNet-50-sized problems through the autotuner
# ----------------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(8, 64, 56, 64, 3, 1, 1), (8, 256, 56, 64, 1, 1, 0), (8, 128, 56, 128, 3, 2, 1),
                                   (8, 512, 7, 2048, 1, 1, 0)], ids=["3x3", "1x1_reduce", "3x3_s2", "1x1_expand"])
def test_gpu_parity(shape, dtype):
    n, c_in, hw, c_out, k, s, p = shape
    case = StatsCase("gpu", n, c_in, (hw, hw), c_out, k, stride=s, padding=p)
    args, kwargs = sample(case, dtype, "cuda", "nhwc")
    outs = [t.clone() for t in rf.conv_stats(*args, **kwargs, backend="triton")]
    same = eager_same_dtype(*args, **kwargs)
    for name, a, t, o in zip(("y", "mean", "var"), outs, same, oracle(args, kwargs)):
        assert_parity(a, t, o, what=name)
    again = rf.conv_stats(*args, **kwargs, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(outs, again)), "not deterministic"
