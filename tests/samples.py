"""One sample-input generator per op, reused by the parity, gradient and opcheck tests, the error bound every
parity test uses, and a recorder of the ops a call runs."""
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused as rf
from resnet_fused.testing import parity

MEMORY_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shape: what every conv op's cases share (conv_output_hw reads it)."""
    name: str
    n: int
    c_in: int
    hw: tuple[int, int]
    c_out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1


@dataclass(frozen=True)
class ConvCase(ConvGeometry):
    """A conv_bn_act case: the geometry and the epilogue."""
    bias: bool = True
    residual: bool = True
    relu: bool = True


# Odd shapes on purpose: 7 and 3 channels, 17x17, batch 0 and 1, depthwise, stems, no-epilogue paths.
CONV_CASES = [
    ConvCase("3x3", 2, 8, (9, 9), 8, 3, padding=1),
    ConvCase("odd_7ch_17x17", 1, 7, (17, 17), 5, 3, padding=1),
    ConvCase("stride2_pad", 2, 6, (11, 13), 12, 3, stride=2, padding=1),
    ConvCase("dilation2", 1, 4, (12, 12), 4, 3, padding=2, dilation=2),
    ConvCase("groups2", 2, 8, (7, 7), 6, 3, padding=1, groups=2),
    ConvCase("depthwise", 1, 6, (9, 9), 6, 3, padding=1, groups=6),
    ConvCase("1x1_stride2", 2, 16, (8, 8), 8, 1, stride=2),
    ConvCase("stem_7x7", 1, 3, (20, 20), 8, 7, stride=2, padding=3),
    ConvCase("no_bias_no_residual", 2, 5, (6, 6), 7, 3, bias=False, residual=False),
    ConvCase("no_relu", 2, 4, (5, 5), 4, 3, padding=1, relu=False),
    ConvCase("residual_only", 1, 4, (5, 5), 4, 1, bias=False),
    ConvCase("batch0", 0, 4, (5, 5), 4, 3, padding=1),
]


def conv_output_hw(case: ConvGeometry) -> tuple[int, int]:
    return tuple(
        (size + 2 * case.padding - case.dilation * (case.kernel - 1) - 1) // case.stride + 1 for size in case.hw
    )


def conv_sample(case: ConvCase, dtype=torch.float32, device="cpu", memory_format="nchw", requires_grad=False):
    """(args, kwargs) for rf.conv_bn_act and the reference."""
    fmt = MEMORY_FORMATS[memory_format]

    def make(*shape, scale=1.0):
        t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        t = t.contiguous(memory_format=fmt) if t.dim() == 4 else t
        return t.requires_grad_(requires_grad)

    fan_in = case.c_in // case.groups * case.kernel**2
    x = make(case.n, case.c_in, *case.hw)
    weight = make(case.c_out, case.c_in // case.groups, case.kernel, case.kernel, scale=fan_in**-0.5)
    bias = make(case.c_out) if case.bias else None
    residual = make(case.n, case.c_out, *conv_output_hw(case)) if case.residual else None
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups, relu=case.relu)
    return (x, weight, bias, residual), kwargs


@dataclass(frozen=True)
class BNCase:
    name: str
    shape: tuple[int, int, int, int]
    residual: bool = True
    relu: bool = True


BN_CASES = [
    BNCase("basic", (4, 8, 5, 5)),
    BNCase("odd_7ch_17x17", (2, 7, 17, 17)),
    BNCase("batch1", (1, 3, 4, 6)),
    BNCase("no_residual", (3, 5, 3, 3), residual=False),
    BNCase("no_relu", (2, 6, 4, 4), relu=False),
    BNCase("one_pixel", (5, 4, 1, 1)),
    BNCase("batch0", (0, 3, 4, 4)),
    # More channels than one register block of the CPU kernels' NHWC reductions (64 or 128), plus a tail.
    BNCase("wide_131ch", (2, 131, 2, 3)),
]


# (x dtype, BN parameter dtype): same dtype, and float32 parameters with a low-precision x as under autocast.
BN_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
BN_DTYPE_IDS = [f"{str(x)[6:]}-{str(p)[6:]}" for x, p in BN_DTYPES]


def bn_sample(case: BNCase, dtype=torch.float32, device="cpu", memory_format="nchw", requires_grad=False,
              param_dtype=None):
    """(x, weight, bias, running_mean, running_var, residual); the running stats are never zero-mean/unit-var
    so that using the wrong statistics shows."""
    fmt = MEMORY_FORMATS[memory_format]
    param_dtype = param_dtype or dtype
    channels = case.shape[1]

    def act(shape, grad):
        t = (torch.randn(*shape, dtype=torch.float64) * 2 + 0.5).to(dtype=dtype, device=device)
        return t.contiguous(memory_format=fmt).requires_grad_(grad)

    def param(values, grad):
        return values.to(dtype=param_dtype, device=device).requires_grad_(grad)

    x = act(case.shape, requires_grad)
    weight = param(torch.rand(channels, dtype=torch.float64) + 0.5, requires_grad)
    bias = param(torch.randn(channels, dtype=torch.float64), requires_grad)
    running_mean = param(torch.randn(channels, dtype=torch.float64) * 0.1, False)
    running_var = param(torch.rand(channels, dtype=torch.float64) + 0.5, False)
    residual = act(case.shape, requires_grad) if case.residual else None
    return x, weight, bias, running_mean, running_var, residual


def backends_for(op: str, device: str) -> list[str]:
    """The backends that have a kernel for `op` and can run on tensors on `device` here."""
    names = []
    for name in rf.available_backends():
        if not rf.backends.has_kernel(op, name):
            continue
        if (name == "cpu" and device != "cpu") or (name == "cuda" and device != "cuda"):
            continue
        if name == "triton" and device == "cpu" and not rf.backends.triton_interpret():
            continue
        names.append(name)
    return names


def skip_unless_runs(op: str, backend: str, device: str, dtype: torch.dtype) -> None:
    """Skips, with the reason, a (backend, device, dtype) combination that cannot run here."""
    if backend not in backends_for(op, device):
        pytest.skip(f"backend {backend!r} cannot run {op} on {device} here")
    if not rf.backends.supports_dtype(op, backend, dtype):
        pytest.skip(f"backend {backend!r} does not run {op} on {dtype}")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bfloat16 tl.dot wrongly (ENV.md); bfloat16 runs on the GPU")


def to_float64(tensors):
    """Detached float64 copies, keeping requires_grad, for the float64 oracle."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            # clone: .to() of a float64 tensor is the tensor itself, and in-place running-stat updates
            # must not reach the original
            c = t.detach().to(torch.float64).clone()
            out.append(c.requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def assert_parity(actual: torch.Tensor, same_dtype_torch: torch.Tensor, oracle: torch.Tensor, what: str = "output"):
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    result = parity(actual, same_dtype_torch, oracle)
    assert result.ok, f"{what} ({actual.dtype}): {result}"


class OpRecorder(TorchDispatchMode):
    """Records the ops that run while it is active, in order, as their overloads (`seen`): those a C++ autograd
    node calls included, which Python monkeypatching cannot see."""

    def __enter__(self):
        self.seen = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))
