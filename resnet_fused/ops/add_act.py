"""rf.add_act: residual add + optional ReLU, the tail of a block whose BN was applied elsewhere."""
import torch

from .. import reference
from .._library import library_loaded
from ..backends import resolve_backend
from ._checks import check_same_device, check_same_dtype, check_shape, check_tensor
from ._eager_autograd import eager, register_autograd
from ._layout import dense, empty_output, output_memory_format


def add_act(x, residual, *, relu=True, backend=None):
    """act(x + residual) in one op; the output follows x's memory format."""
    check_tensor(x, "x")
    check_tensor(residual, "residual")
    check_shape(residual, "residual", x.shape)
    check_same_dtype(x, "x", residual=residual)
    check_same_device(x, "x", residual=residual)
    name = resolve_backend("add_act", backend, x.device, x.dtype)
    x, residual = dense(x), dense(residual)
    if name == "reference":
        return reference.add_act(x, residual, relu).contiguous(memory_format=output_memory_format(x))
    ops = torch.ops.resnet_fused
    op = ops.add_act_triton.default if name == "triton" else ops.add_act.default
    return eager(op)(x, residual, relu)


def _fake(x, residual, relu):
    return empty_output(x, x.shape)


def _setup_context(ctx, inputs, output):
    ctx.relu = inputs[2]
    ctx.save_for_backward(output if ctx.relu else None)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    grad_pre = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
    return grad_pre, grad_pre, None


def register_formulas(qualname: str) -> None:
    """Fake kernel and autograd for an add_act op (the C++ one or a backend's custom op)."""
    torch.library.register_fake(qualname)(_fake)
    register_autograd(qualname, _backward, _setup_context)


if library_loaded("_C"):
    register_formulas("resnet_fused::add_act")
