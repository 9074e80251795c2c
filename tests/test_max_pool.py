"""rf.max_pool2d (max pool without indices) against F.max_pool2d, and where the fused models use it."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from samples import MEMORY_FORMATS, OpRecorder, backends_for, skip_unless_runs

import resnet_fused as rf

BACKENDS = ["reference", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OURS = torch.ops.resnet_fused.max_pool2d.default


@dataclass(frozen=True)
class PoolCase:
    name: str
    shape: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    ceil_mode: bool = False

    @property
    def args(self) -> tuple:
        return self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode


# The ResNet stem's pool, odd sizes and channel counts (vector tails), ceil_mode windows that hang over the edge,
# dilation, rectangular windows, overlapping and non-overlapping strides, batch 0 and 1.
POOL_CASES = [
    PoolCase("stem", (2, 8, 16, 16), (3, 3), (2, 2), (1, 1)),
    PoolCase("odd_7ch_17x17", (1, 7, 17, 17), (3, 3), (2, 2), (1, 1)),
    PoolCase("ceil_mode", (2, 5, 10, 9), (3, 3), (2, 2), (1, 0), ceil_mode=True),
    PoolCase("dilation", (1, 6, 12, 11), (3, 2), (1, 2), (1, 1), (2, 3)),
    PoolCase("dilation_ceil", (1, 3, 9, 10), (2, 2), (3, 3), (1, 1), (2, 2), True),
    PoolCase("window_2x2", (3, 37, 8, 8), (2, 2), (2, 2)),
    PoolCase("stride_1", (2, 16, 5, 7), (3, 3), (1, 1), (1, 1)),
    PoolCase("whole_plane", (2, 65, 4, 4), (4, 4), (4, 4)),
    PoolCase("batch0", (0, 4, 6, 6), (3, 3), (2, 2), (1, 1)),
]


def pool_sample(case: PoolCase, dtype=torch.float32, device="cpu", memory_format="nhwc", requires_grad=False,
                nan=False):
    """x for a case: distinct values (no exact ties, so gradients are unambiguous), optionally one NaN."""
    n, c, h, w = case.shape
    x = torch.randperm(n * c * h * w, dtype=torch.float64).reshape(case.shape) / max(1, n * c * h * w) - 0.5
    if nan and x.numel():
        x[0, c - 1, h // 2, w // 2] = float("nan")
    x = x.to(dtype=dtype, device=device).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    return x.requires_grad_(requires_grad)


def assert_same_pool(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max is exact in every dtype: the values (NaN included), dtype and strides of F.max_pool2d's output."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda case: case.name)
def test_forward_matches_torch(case, backend, dtype, memory_format, nan, device):
    skip_unless_runs("max_pool2d", backend, device, dtype)
    x = pool_sample(case, dtype, device, memory_format, nan=nan)
    assert_same_pool(rf.max_pool2d(x, *case.args, backend=backend), F.max_pool2d(x, *case.args))


@pytest.mark.parametrize("view", ["channel_slice", "strided_columns", "permuted"])
def test_non_contiguous_input(view):
    skip_unless_runs("max_pool2d", "cpu", "cpu", torch.float32)
    x = torch.randn(2, 12, 11, 14).contiguous(memory_format=torch.channels_last)
    x = {"channel_slice": x[:, 2:9], "strided_columns": x[..., ::2], "permuted": x.permute(0, 1, 3, 2)}[view]
    assert_same_pool(rf.max_pool2d(x, 3, 2, 1, backend="cpu"), F.max_pool2d(x, 3, 2, 1))


def test_defaults_follow_f_max_pool2d():
    skip_unless_runs("max_pool2d", "cpu", "cpu", torch.float32)
    x = torch.randn(1, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    assert_same_pool(rf.max_pool2d(x, 2), F.max_pool2d(x, 2))  # stride defaults to the kernel size
    assert_same_pool(rf.max_pool2d(x, (3, 2), (1, 2), (1, 0), (2, 1), True), F.max_pool2d(x, (3, 2), (1, 2), (1, 0),
                                                                                          (2, 1), True))


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [POOL_CASES[1], POOL_CASES[3], POOL_CASES[4]], ids=lambda case: case.name)
def test_gradients(case, backend, memory_format, device):
    skip_unless_runs("max_pool2d", backend, device, torch.float64)
    x = pool_sample(case, torch.float64, device, memory_format, requires_grad=True)
    out = rf.max_pool2d(x, *case.args, backend=backend)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(F.max_pool2d(x, *case.args), x, grad)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad), expected, rtol=0, atol=0)
    if device == "cpu":
        assert torch.autograd.gradcheck(lambda t: rf.max_pool2d(t, *case.args, backend=backend), (x,))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_opcheck(memory_format, requires_grad):
    skip_unless_runs("max_pool2d", "cpu", "cpu", torch.float32)
    for case in (POOL_CASES[0], POOL_CASES[2], POOL_CASES[-1]):
        x = pool_sample(case, torch.float32, "cpu", memory_format, requires_grad and case.shape[0] > 0)
        torch.library.opcheck(OURS, (x, *map(list, case.args[:4]), case.ceil_mode))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    skip_unless_runs("max_pool2d", backend, device, torch.float32)
    x = pool_sample(POOL_CASES[1], torch.float32, device, "nhwc", requires_grad=True)
    fn = lambda t: rf.max_pool2d(t, 3, 2, 1, backend=backend)  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, fn(x))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("error,message,args", [
    (ValueError, r"x must be 4-D \(N, C, H, W\), got shape \(3, 8, 8\)", (torch.randn(3, 8, 8), 2)),
    (TypeError, "x must have a floating-point dtype", (torch.ones(1, 2, 4, 4, dtype=torch.int64), 2)),
    (TypeError, "kernel_size must be an int or a pair of ints", (torch.randn(1, 2, 4, 4), (2, 2, 2))),
    (ValueError, "stride must be >= 1", (torch.randn(1, 2, 4, 4), 2, 0)),
    (ValueError, r"padding must be at most half the kernel size, got padding=\(2, 2\)", (torch.randn(1, 2, 4, 4), 3,
                                                                                          1, 2)),
    (RuntimeError, "Output size is too small", (torch.randn(1, 2, 3, 3).contiguous(memory_format=torch.channels_last),
                                                5)),
])
def test_bad_input(backend, error, message, args):
    skip_unless_runs("max_pool2d", backend, "cpu", torch.float32)
    with pytest.raises(error, match=message):
        rf.max_pool2d(*args, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        rf.max_pool2d(torch.randn(1, 2, 4, 4), 2, backend="fast")


def _pools_run(model, x) -> tuple[int, int]:
    """(resnet_fused max pools, ATen max pools) that one forward of model runs."""
    with OpRecorder() as recorder:
        model(x)
    ours = sum(op is OURS for op in recorder.seen)
    aten = sum(op in (torch.ops.aten.max_pool2d_with_indices.default, torch.ops.aten.max_pool2d.default)
               for op in recorder.seen)
    return ours, aten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet_stem_pools_without_indices_in_inference(dtype):
    skip_unless_runs("max_pool2d", "cpu", "cpu", dtype)
    model = rf.models.resnet18().eval().to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 40, 40, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)  # the first call of a signature runs step by step, later ones as chains
        assert _pools_run(model, x) == (1, 0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_stem_pool_is_the_module_where_a_hook_or_a_gradient_needs_it():
    skip_unless_runs("max_pool2d", "cpu", "cpu", torch.float32)
    model = rf.models.resnet18().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    assert _pools_run(model, x)[0] == 0  # grad mode on and parameters that require grad: ATen's pool
    seen = []
    model.maxpool.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        assert _pools_run(model, x) == (0, 1)
    assert seen == [(2, 64, 10, 10)]


def test_graph_pass_stem_pools_without_indices_in_inference():
    timm = pytest.importorskip("timm")
    skip_unless_runs("max_pool2d", "cpu", "cpu", torch.float32)
    model = rf.fuse(timm.create_model("resnet26t", pretrained=False).to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        assert _pools_run(model, x) == (1, 0)


def test_recomputing_stem_op_pools_without_indices_in_its_forward():
    skip_unless_runs("max_pool2d", "cpu", "cpu", torch.float32)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    with OpRecorder() as recorder:
        out = rf.ops.recomputed_bn_relu.bn_relu_max_pool(x, weight, bias, None, None, momentum=0.1, eps=1e-5,
                                                         kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    assert OURS in recorder.seen and torch.ops.aten.max_pool2d_with_indices.default not in recorder.seen
    expected = F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, training=True)), 3, 2, 1)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, weight, bias), grad),
                               torch.autograd.grad(expected, (x, weight, bias), grad))
