"""rf.scale_add_act (act(x * scale[n, c] + residual): an SE/ECA block's gate, shortcut and ReLU in one op) against
its plain-PyTorch reference in float64, and where the graph pass of rf.fuse uses it."""
import copy

import pytest
import torch
from samples import MEMORY_FORMATS, OpRecorder, assert_parity, backends_for, skip_unless_runs, to_float64

import resnet_fused as rf
from resnet_fused import reference

BACKENDS = ["reference", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Vector tails (7 and 37 channels), one channel, odd planes, batch 0 and 1, ResNet-50's widest tail.
SHAPES = {"basic": (2, 8, 5, 5), "odd": (1, 7, 17, 17), "wide_tail": (3, 37, 3, 1), "one_channel": (2, 1, 4, 3),
          "batch0": (0, 4, 3, 3), "layer4": (2, 2048, 2, 2)}


def scale_add_act_sample(shape, dtype=torch.float32, device="cpu", memory_format="nchw", requires_grad=False):
    """[x, scale, residual]: scale in (0, 1) as a sigmoid gate's, one per sample and channel."""
    fmt = MEMORY_FORMATS[memory_format]
    x, residual = (torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device).contiguous(memory_format=fmt)
                   for _ in range(2))
    scale = torch.rand(shape[:2], dtype=torch.float64).to(dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (x, scale, residual)]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_backward_parity(shape, backend, dtype, memory_format, relu, device):
    skip_unless_runs("scale_add_act", backend, device, dtype)
    inputs = scale_add_act_sample(shape, dtype, device, memory_format, requires_grad=True)
    out = rf.scale_add_act(*inputs, relu=relu, backend=backend)
    assert out.dtype == dtype and out.shape == shape
    assert out.is_contiguous(memory_format=MEMORY_FORMATS[memory_format]) or out.numel() == 0
    same_dtype = reference.scale_add_act(*inputs, relu)
    oracle_inputs = [t.detach().requires_grad_() for t in to_float64(inputs)]
    oracle = reference.scale_add_act(*oracle_inputs, relu)
    assert_parity(out, same_dtype, oracle)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    grads = torch.autograd.grad(out, inputs, grad)
    same_dtype_grads = torch.autograd.grad(same_dtype, inputs, grad)
    oracle_grads = torch.autograd.grad(oracle, oracle_inputs, grad.double())
    for name, *results in zip(("x", "scale", "residual"), grads, same_dtype_grads, oracle_grads):
        assert_parity(*results, what=f"grad of {name}")


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, relu, device):
    skip_unless_runs("scale_add_act", backend, device, torch.float64)
    inputs = scale_add_act_sample(SHAPES["odd"], torch.float64, device, "nhwc", requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: rf.scale_add_act(*a, relu=relu, backend=backend), inputs)


def test_double_backward_raises():
    skip_unless_runs("scale_add_act", "cpu", "cpu", torch.float64)
    x, scale, residual = scale_add_act_sample(SHAPES["basic"], torch.float64, requires_grad=True)
    grad_x, = torch.autograd.grad(rf.scale_add_act(x, scale, residual, backend="cpu").sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize("view", ["channel_slice", "strided_columns", "scale_column"])
def test_non_contiguous_inputs(view):
    skip_unless_runs("scale_add_act", "cpu", "cpu", torch.float32)
    x, scale, residual = scale_add_act_sample((2, 12, 6, 8), memory_format="nhwc")
    if view == "channel_slice":
        x, scale, residual = x[:, 2:9], scale[:, 2:9], residual[:, 2:9]
    elif view == "strided_columns":
        x, residual = x[..., ::2], residual[..., ::2]
    else:  # a gate read as a column of a (N, C, 1, 1) tensor's transpose: strides (1, N)
        scale = scale.t().contiguous().t()
    torch.testing.assert_close(rf.scale_add_act(x, scale, residual, backend="cpu"),
                               reference.scale_add_act(x, scale, residual))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_opcheck(memory_format, requires_grad):
    if "cpu" not in backends_for("scale_add_act", "cpu"):
        pytest.skip("the C++ library is not loaded")
    x, scale, residual = scale_add_act_sample(SHAPES["basic"], torch.float32, "cpu", memory_format, requires_grad)
    transposed = scale.detach().t().contiguous().t().requires_grad_(requires_grad)  # strides (1, N)
    for gate in (scale, transposed):
        for relu in (True, False):
            torch.library.opcheck(torch.ops.resnet_fused.scale_add_act.default, (x, gate, residual, relu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    skip_unless_runs("scale_add_act", backend, device, torch.float32)
    inputs = scale_add_act_sample(SHAPES["basic"], torch.float32, device, "nhwc", requires_grad=True)
    fn = lambda *a: rf.scale_add_act(*a, backend=backend)  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(out, fn(*inputs))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(fn(*inputs).sum(), inputs))


@pytest.mark.parametrize("error,message,args", [
    (ValueError, "x must be 4-D", (torch.randn(2, 3), torch.rand(2, 3), torch.randn(2, 3))),
    (ValueError, r"scale must have shape \(2, 3\)",
     (torch.randn(2, 3, 4, 4), torch.rand(3, 2), torch.randn(2, 3, 4, 4))),
    (ValueError, "scale must be 2-D", (torch.randn(2, 3, 4, 4), torch.rand(2, 3, 1, 1), torch.randn(2, 3, 4, 4))),
    (ValueError, r"residual must have shape \(2, 3, 4, 4\)",
     (torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.randn(2, 3, 4, 5))),
    (TypeError, "scale has dtype torch.float64", (torch.randn(2, 3, 4, 4), torch.rand(2, 3).double(),
                                                  torch.randn(2, 3, 4, 4))),
    (TypeError, "residual has dtype torch.float16", (torch.randn(2, 3, 4, 4), torch.rand(2, 3),
                                                     torch.randn(2, 3, 4, 4).half())),
    (RuntimeError, "residual is on meta", (torch.randn(2, 3, 4, 4), torch.rand(2, 3),
                                           torch.randn(2, 3, 4, 4, device="meta"))),
])
def test_bad_input(error, message, args):
    with pytest.raises(error, match=message):
        rf.scale_add_act(*args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        rf.scale_add_act(*scale_add_act_sample(SHAPES["basic"]), backend="fast")


def test_bad_input_to_the_cpu_op():
    """The C++ op checks what the Python entry point checks, for callers of torch.ops.resnet_fused directly."""
    skip_unless_runs("scale_add_act", "cpu", "cpu", torch.float32)
    x, scale, residual = scale_add_act_sample(SHAPES["basic"])
    op = torch.ops.resnet_fused.scale_add_act.default
    with pytest.raises(RuntimeError, match=r"scale must have shape \(N, C\)"):
        op(x, scale[:1], residual, True)
    with pytest.raises(RuntimeError, match="x and scale dtypes differ"):
        op(x, scale.double(), residual, True)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        op(x, scale, residual[:1], True)


def _calls(recorder: OpRecorder) -> int:
    return recorder.seen.count(torch.ops.resnet_fused.scale_add_act.default)


# The graph pass: timm's SE and ECA gates are inlined into their blocks' graphs, where gate * x + shortcut -> ReLU
# becomes one scale_add_act call; any other product falls back to PyTorch's multiply, add and ReLU.

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["seresnet50", "ecaresnet50d"])
def test_fused_se_blocks_run_scale_add_act(name):
    skip_unless_runs("scale_add_act", "cpu", "cpu", torch.float32)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).to(memory_format=torch.channels_last)
    fused = rf.fuse(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for training in (False, True):
        model.train(training), fused.train(training)
        with OpRecorder() as recorder:
            out = fused(x)
        # 12 of the 16 blocks: in the 4 with a downsample branch its BN takes the add (bn_act with the gated
        # tensor as its residual)
        assert _calls(recorder) == 12
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(fused(x).sum(), list(fused.parameters()))
    expected = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-4)


def test_gate_multiply_that_is_not_per_channel_falls_back():
    """A product whose factors are not (x, one value per sample and channel) runs as PyTorch runs it."""
    from resnet_fused.graph_fuse import GraphFusedAddReLU

    step = GraphFusedAddReLU("cpu")
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for gate in (torch.rand(2, 3, 4, 4), torch.rand(1, 3, 1, 1), torch.rand(2, 3, 1, 1).double()):
        with OpRecorder() as recorder:
            out = step(a, b, gate)
        assert _calls(recorder) == 0
        torch.testing.assert_close(out, torch.relu(a * gate + b))
    for gate in (torch.rand(2, 3, 1, 1), torch.rand(2, 3).view(2, 3, 1, 1).expand(2, 3, 4, 4)):
        with OpRecorder() as recorder:
            out = step(a, b, gate) if gate.shape[2] == 1 else step(gate, b, a)  # either factor may be the gate
        assert _calls(recorder) == 1
        torch.testing.assert_close(out, torch.relu(a * gate + b))


def test_gate_on_a_backend_without_scale_add_act_multiplies_first():
    """On a backend whose add_act has no scale_add_act beside it (triton, cuda), the step multiplies, then adds."""
    from resnet_fused.graph_fuse import GraphFusedAddReLU

    skip_unless_runs("add_act", "triton", "cpu", torch.float32)
    assert not rf.backends.has_kernel("scale_add_act", "triton")
    a, b, gate = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2, 3, 1, 1)
    with OpRecorder() as recorder:
        out = GraphFusedAddReLU("triton")(a, b, gate)
    assert _calls(recorder) == 0 and torch.ops.resnet_fused.add_act_triton.default in recorder.seen
    torch.testing.assert_close(out, torch.relu(a * gate + b))
