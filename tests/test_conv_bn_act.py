import pytest
import torch
from samples import (CONV_CASES, MEMORY_FORMATS, ConvCase, assert_parity, backends_for, conv_sample,
                     skip_unless_runs, to_float64)

import resnet_fused as rf
from resnet_fused import reference

BACKENDS = ["reference", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CASE_IDS = [c.name for c in CONV_CASES]


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_forward_parity(case, backend, dtype, memory_format, device):
    skip_unless_runs("conv_bn_act", backend, device, dtype)
    args, kwargs = conv_sample(case, dtype, device, memory_format)
    out = rf.conv_bn_act(*args, **kwargs, backend=backend)
    assert out.dtype == dtype and out.device == args[0].device
    assert out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])
    assert_parity(out, reference.conv_bn_act(*args, **kwargs), reference.conv_bn_act(*to_float64(args), **kwargs))


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_gradient_parity(case, backend, memory_format, device):
    skip_unless_runs("conv_bn_act", backend, device, torch.float32)
    args, kwargs = conv_sample(case, torch.float32, device, memory_format, requires_grad=True)
    oracle_args = to_float64(args)
    grad_out = torch.randn_like(reference.conv_bn_act(*oracle_args, **kwargs))
    inputs = [t for t in args if t is not None]
    oracle_inputs = [t for t in oracle_args if t is not None]

    actual = torch.autograd.grad(rf.conv_bn_act(*args, **kwargs, backend=backend), inputs, grad_out.float())
    same_dtype = torch.autograd.grad(reference.conv_bn_act(*args, **kwargs), inputs, grad_out.float())
    oracle = torch.autograd.grad(reference.conv_bn_act(*oracle_args, **kwargs), oracle_inputs, grad_out)
    for name, a, t, o in zip(["x", "weight", "bias", "residual"], actual, same_dtype, oracle):
        assert_parity(a, t, o, what=f"grad of {name}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.n > 0], ids=lambda c: c.name)
def test_gradcheck_float64(case, backend):
    skip_unless_runs("conv_bn_act", backend, "cpu", torch.float64)
    args, kwargs = conv_sample(case, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: rf.conv_bn_act(*a, **kwargs, backend=backend), args)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.n > 0][:3], ids=lambda c: c.name)
def test_gradgradcheck_float64(case):
    """The backward is PyTorch ops, so conv_bn_act is twice differentiable, through rf.conv_bn_act's eager
    autograd as through the op's registered formulas."""
    skip_unless_runs("conv_bn_act", "cpu", "cpu", torch.float64)
    args, kwargs = conv_sample(case, torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *a: rf.conv_bn_act(*a, **kwargs, backend="cpu"), args)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_opcheck(case, memory_format, requires_grad, device):
    if "cpu" not in backends_for("conv_bn_act", "cpu"):
        pytest.skip("the C++ library is not loaded")
    (x, weight, bias, residual), kw = conv_sample(case, torch.float32, device, memory_format, requires_grad)
    pair = lambda v: [v, v]  # noqa: E731
    torch.library.opcheck(
        torch.ops.resnet_fused.conv_bn_act.default,
        (x, weight, bias, residual, pair(kw["stride"]), pair(kw["padding"]), pair(kw["dilation"]), kw["groups"], kw["relu"]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    skip_unless_runs("conv_bn_act", backend, device, torch.float32)
    case = CONV_CASES[2]
    args, kwargs = conv_sample(case, torch.float32, device, "nhwc", requires_grad=True)

    def block(*a):
        return rf.conv_bn_act(*a, **kwargs, backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, expected = compiled(*args), block(*args)
    torch.testing.assert_close(out, expected)
    inputs = [t for t in args if t is not None]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, device):
    skip_unless_runs("conv_bn_act", backend, device, torch.float32)
    case = CONV_CASES[0]
    (x, weight, bias, residual), kwargs = conv_sample(case, torch.float32, device, "nhwc")
    wide = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], device=device).to(memory_format=torch.channels_last)
    x_view = wide[..., ::2]  # neither NCHW- nor NHWC-contiguous
    assert not x_view.is_contiguous() and not x_view.is_contiguous(memory_format=torch.channels_last)
    out = rf.conv_bn_act(x_view, weight, bias, residual, **kwargs, backend=backend)
    torch.testing.assert_close(out, reference.conv_bn_act(x_view, weight, bias, residual, **kwargs))
    assert out.is_contiguous(memory_format=torch.channels_last)  # channels stay innermost, as in the input


@pytest.mark.parametrize("shape,layout,channels_last", [
    ((2, 16, 5, 5), "nchw", False),
    ((2, 16, 5, 5), "nhwc", True),
    ((2, 16, 1, 1), "nhwc", False),  # contiguous in both formats: NCHW
    ((2, 1, 5, 5), "nhwc", False),  # C == 1: contiguous in both formats: NCHW
    ((0, 16, 5, 5), "nhwc", True),  # empty: counts as NCHW-contiguous, so the channels_last strides decide
    ((0, 16, 5, 5), "nchw", False),
], ids=["nchw", "nhwc", "1x1_spatial", "one_channel", "empty_nhwc", "empty_nchw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_memory_format(shape, layout, channels_last, backend, device):
    skip_unless_runs("conv_bn_act", backend, device, torch.float32)
    x = torch.randn(shape, device=device).contiguous(memory_format=MEMORY_FORMATS[layout])
    weight = torch.randn(8, shape[1], 1, 1, device=device)
    out = rf.conv_bn_act(x, weight, backend=backend)
    expected = torch.empty(out.shape, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert out.stride() == expected.stride()


# 'same' with an even kernel pads one more row and column at the end, which makes a 1-high input valid.
@pytest.mark.parametrize("padding,kernel,hw", [(padding, kernel, (9, 9)) for padding in ("same", "valid")
                                               for kernel in (3, 4)] + [("same", 3, (1, 6)), ("same", 4, (1, 6))])
def test_string_padding(padding, kernel, hw):
    x = torch.randn(2, 3, *hw)
    weight = torch.randn(4, 3, kernel, kernel)
    for backend in backends_for("conv_bn_act", "cpu"):
        out = rf.conv_bn_act(x, weight, padding=padding, relu=False, backend=backend)
        torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, padding=padding))


def test_default_backend_choice():
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    expected_cpu = "cpu" if "cpu" in rf.available_backends() else "reference"
    assert rf.backends.resolve_backend("conv_bn_act", None, cpu, f32) == expected_cpu
    # No GPU kernel has a recorded parity run yet, so CUDA tensors take the reference path (cuDNN).
    assert rf.backends.resolve_backend("conv_bn_act", None, cuda, f32) == "reference"
    with rf.use_backend("reference"):
        assert rf.backends.resolve_backend("conv_bn_act", None, cpu, f32) == "reference"
        if "cpu" in rf.available_backends():
            with rf.use_backend("cpu"):
                assert rf.backends.resolve_backend("conv_bn_act", None, cpu, f32) == "cpu"
            assert rf.backends.resolve_backend("conv_bn_act", "cpu", cpu, f32) == "cpu"  # explicit wins
        assert rf.backends.resolve_backend("conv_bn_act", None, cpu, f32) == "reference"
    assert rf.backends.resolve_backend("conv_bn_act", None, cpu, f32) == expected_cpu


BAD_INPUTS = [
    # (description, change to the good call, error type, message fragment)
    ("3-d x", lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
    ("2-d weight", lambda a: a.update(weight=a["weight"][:, :, 0, 0]), ValueError, "weight must be 4-D"),
    ("channel mismatch", lambda a: a.update(x=torch.randn(2, 5, 9, 9)), ValueError, "x has 5 channels"),
    ("groups mismatch", lambda a: a.update(groups=3), ValueError, "groups=3"),
    ("groups zero", lambda a: a.update(groups=0), ValueError, "groups must be a positive int"),
    ("bias shape", lambda a: a.update(bias=torch.randn(3)), ValueError, "bias must have shape (8,)"),
    ("residual shape", lambda a: a.update(residual=torch.randn(2, 8, 8, 8)), ValueError, "residual must have shape (2, 8, 9, 9)"),
    ("mixed dtypes", lambda a: a.update(weight=a["weight"].double()), TypeError, "weight has dtype torch.float64"),
    ("integer x", lambda a: a.update(x=a["x"].long()), TypeError, "x must have a floating-point dtype"),
    ("not a tensor", lambda a: a.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("mixed devices", lambda a: a.update(residual=a["residual"].to("meta")), RuntimeError, "residual is on meta"),
    ("negative padding", lambda a: a.update(padding=-1), ValueError, "padding must be >= 0"),
    ("zero stride", lambda a: a.update(stride=(1, 0)), ValueError, "stride must be >= 1"),
    ("bad padding string", lambda a: a.update(padding="full"), ValueError, "padding must be an int"),
    ("same with stride", lambda a: a.update(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    ("kernel larger than input", lambda a: a.update(x=torch.randn(2, 8, 1, 1), residual=None, padding=0), ValueError, "smaller than the kernel"),
    ("unknown backend", lambda a: a.update(backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
    # Equal to the good call's values (1 == 1.0 == True), but not ints: the check cache must tell them apart.
    ("float stride", lambda a: a.update(stride=1.0), TypeError, "stride must be an int or a pair of ints"),
    ("float in a padding pair", lambda a: a.update(padding=(1.0, 1)), TypeError, "padding must be an int or a pair"),
    ("bool dilation", lambda a: a.update(dilation=True), TypeError, "dilation must be an int or a pair of ints"),
    ("float groups", lambda a: a.update(groups=1.0), ValueError, "groups must be a positive int"),
]


@pytest.mark.parametrize("change,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(change, error, message):
    (x, weight, bias, residual), kwargs = conv_sample(ConvCase("bad", 2, 8, (9, 9), 8, 3, padding=1))
    call = dict(x=x, weight=weight, bias=bias, residual=residual, **kwargs)
    rf.conv_bn_act(**call)  # the good call first: its checks are then cached (CheckCache), the bad call's must not be
    change(call)
    for _ in range(2):  # and a failed check is not cached either
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            rf.conv_bn_act(**call)


def test_unavailable_backend_is_named():
    (x, weight, bias, residual), kwargs = conv_sample(CONV_CASES[0])
    missing = [name for name in BACKENDS if name not in rf.available_backends()]
    for name in missing:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: "):
            rf.conv_bn_act(x, weight, bias, residual, **kwargs, backend=name)
    if "cpu" in rf.available_backends():
        with pytest.raises(RuntimeError, match="backend 'cpu' runs on CPU tensors, but the inputs are on meta"):
            rf.conv_bn_act(*(t.to("meta") for t in (x, weight, bias, residual)), **kwargs, backend="cpu")


@pytest.mark.skipif("cpu" not in backends_for("conv_bn_act", "cpu") or not torch.backends.mkldnn.is_available(),
                    reason="needs the CPU backend and oneDNN")
@pytest.mark.parametrize("case", [c for c in CONV_CASES if (c.residual or c.bias) and c.n > 0], ids=lambda c: c.name)
def test_prepacked_weight(case):
    """A weight prepacked for oneDNN (mkldnn._reorder_convolution_weight) gives the plain weight's result; where
    oneDNN cannot run the conv, the op says so rather than guess."""
    args, kwargs = conv_sample(case, torch.float32, "cpu", "nhwc")
    x, weight, *rest = args
    padding = kwargs.get("padding", 0)
    if isinstance(padding, str):
        pytest.skip("prepacking takes numeric padding")
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, pair(padding), pair(kwargs.get("stride", 1)),
                                                          pair(kwargs.get("dilation", 1)), kwargs.get("groups", 1),
                                                          list(x.shape))
    want = rf.conv_bn_act(x, weight, *rest, **kwargs, backend="cpu")
    got = rf.conv_bn_act(x, packed, *rest, **kwargs, backend="cpu")
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    nchw = rf.conv_bn_act(x.contiguous(), packed, *[None if t is None else t.contiguous() for t in rest], **kwargs,
                          backend="cpu")
    torch.testing.assert_close(nchw, want)
    assert nchw.is_contiguous()
    with pytest.raises(RuntimeError, match="a prepacked \\(MKLDNN\\) weight needs a convolution oneDNN runs"):
        rf.conv_bn_act(x[:0], packed, *[None if t is None or t.dim() == 1 else t[:0] for t in rest], **kwargs,
                       backend="cpu")
