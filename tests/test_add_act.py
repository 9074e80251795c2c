import pytest
import torch
from samples import MEMORY_FORMATS, assert_parity, backends_for, skip_unless_runs, to_float64

import resnet_fused as rf
from resnet_fused import reference

BACKENDS = ["reference", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = {"basic": (2, 8, 5, 5), "odd": (1, 7, 17, 17), "batch0": (0, 4, 3, 3), "vector_tail": (3, 5, 3, 1)}


def add_act_sample(shape, dtype=torch.float32, device="cpu", memory_format="nchw", requires_grad=False):
    fmt = MEMORY_FORMATS[memory_format]
    return [
        torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device).contiguous(memory_format=fmt).requires_grad_(requires_grad)
        for _ in range(2)
    ]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_parity(shape, backend, dtype, memory_format, relu, device):
    skip_unless_runs("add_act", backend, device, dtype)
    x, residual = add_act_sample(shape, dtype, device, memory_format)
    out = rf.add_act(x, residual, relu=relu, backend=backend)
    assert out.dtype == dtype and out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format])
    assert_parity(out, reference.add_act(x, residual, relu), reference.add_act(*to_float64([x, residual]), relu))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend, relu, device):
    skip_unless_runs("add_act", backend, device, torch.float64)
    x, residual = add_act_sample(SHAPES["odd"], torch.float64, device, "nhwc", requires_grad=True)
    grad = torch.randn_like(x)
    actual = torch.autograd.grad(rf.add_act(x, residual, relu=relu, backend=backend), (x, residual), grad)
    expected = torch.autograd.grad(reference.add_act(x, residual, relu), (x, residual), grad)
    torch.testing.assert_close(actual, expected)
    if device == "cpu":
        assert torch.autograd.gradcheck(lambda a, b: rf.add_act(a, b, relu=relu, backend=backend), (x, residual))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_opcheck(memory_format, requires_grad, device):
    if "cpu" not in backends_for("add_act", "cpu"):
        pytest.skip("the C++ library is not loaded")
    x, residual = add_act_sample(SHAPES["odd"], torch.float32, device, memory_format, requires_grad)
    for relu in (True, False):
        torch.library.opcheck(torch.ops.resnet_fused.add_act.default, (x, residual, relu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    skip_unless_runs("add_act", backend, device, torch.float32)
    x, residual = add_act_sample(SHAPES["basic"], torch.float32, device, "nhwc", requires_grad=True)
    fn = lambda a, b: rf.add_act(a, b, backend=backend)  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, residual)
    torch.testing.assert_close(out, fn(x, residual))


@pytest.mark.parametrize("error,message,args", [
    (ValueError, r"residual must have shape \(2, 3\)", (torch.randn(2, 3), torch.randn(3, 2))),
    (TypeError, "residual has dtype torch.float16", (torch.randn(2, 3), torch.randn(2, 3).half())),
    (TypeError, "x must have a floating-point dtype", (torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))),
    (RuntimeError, "residual is on meta", (torch.randn(2, 3), torch.randn(2, 3, device="meta"))),
])
def test_bad_input(error, message, args):
    with pytest.raises(error, match=message):
        rf.add_act(*args)
