"""rf.max_pool2d: F.max_pool2d without the argmax indices, for inference on the CPU.

ATen's CPU max pool computes and writes the int64 argmax of every output even when nothing will read it
(F.max_pool2d returns the values of max_pool2d_with_indices); the cpu backend's kernel (csrc/cpu/max_pool.cpp)
writes only the values. The fused models run their stem's pool through it in inference (FusedModule._max_pool).
Its backward recomputes the argmax with ATen's kernel, so it is differentiable, but where a gradient is recorded
F.max_pool2d (indices kept from the forward) is the cheaper choice."""
import torch
import torch.nn.functional as F

from .. import reference
from .._library import library_loaded
from ..backends import resolve_backend
from ._checks import check_tensor, pair
from ._eager_autograd import eager, register_autograd


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *, backend=None):
    """F.max_pool2d(x, ...) of a 4-D x (no return_indices): the same values, and the output's memory format is
    the one ATen gives (channels_last for a channels_last x)."""
    check_tensor(x, "x", 4)
    kernel_size = pair(kernel_size, "kernel_size", 1)
    stride = kernel_size if stride is None else pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    if any(p > k // 2 for p, k in zip(padding, kernel_size)):
        raise ValueError(f"padding must be at most half the kernel size, got padding={padding} and "
                         f"kernel_size={kernel_size}")
    name = resolve_backend("max_pool2d", backend, x.device, x.dtype)
    if name == "reference":
        return reference.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return eager(torch.ops.resnet_fused.max_pool2d.default)(x, kernel_size, stride, padding, dilation, ceil_mode)


def _fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    # ATen's own shape and layout rules, which the kernel follows.
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def _setup_context(ctx, inputs, output):
    ctx.pool_args = inputs[1:]
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, *ctx.pool_args)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.pool_args, indices), *[None] * 5


if library_loaded("_C"):
    torch.library.register_fake("resnet_fused::max_pool2d")(_fake)
    register_autograd("resnet_fused::max_pool2d", _backward, _setup_context)
