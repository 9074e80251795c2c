"""rf.scale_add_act: act(x * scale[n, c] + residual), the tail of a block with a squeeze-and-excitation or ECA
gate (SE-ResNet, ResNet-RS, ECA-ResNet): the gate applied to the last BN's output, the shortcut added and the
ReLU in one pass, where PyTorch makes three (multiply, add, ReLU) and writes two activation-sized tensors more;
the backward is one pass as well."""
import torch

from .. import reference
from .._library import library_loaded
from ..backends import resolve_backend
from ._checks import check_same_device, check_same_dtype, check_shape, check_tensor
from ._eager_autograd import eager, op_of, register_autograd
from ._layout import dense, empty_output, output_memory_format


def scale_add_act(x, scale, residual, *, relu=True, backend=None):
    """act(x * scale[:, :, None, None] + residual) in one op: x and residual (N, C, H, W), scale (N, C), all of
    one dtype and device; the output follows x's memory format. Differentiable in x, scale and residual."""
    check_tensor(x, "x", 4)
    check_tensor(scale, "scale", 2)
    check_shape(scale, "scale", x.shape[:2])
    check_tensor(residual, "residual", 4)
    check_shape(residual, "residual", x.shape)
    check_same_dtype(x, "x", scale=scale, residual=residual)
    check_same_device(x, "x", scale=scale, residual=residual)
    name = resolve_backend("scale_add_act", backend, x.device, x.dtype)
    x, residual = dense(x), dense(residual)
    if name == "reference":
        out = reference.scale_add_act(x, scale, residual, relu)
        return out.contiguous(memory_format=output_memory_format(x))
    return eager(torch.ops.resnet_fused.scale_add_act.default)(x, scale, residual, relu)


def _fake(x, scale, residual, relu):
    return empty_output(x, x.shape)


def _fake_backward(grad_out, out, x, scale, relu):
    # grad_scale is a new contiguous (N, C) tensor whatever scale's strides
    grad_pre = empty_output(x, x.shape) if relu else x.new_empty((0,))
    return empty_output(x, x.shape), scale.new_empty(scale.shape), grad_pre


def _setup_context(ctx, inputs, output):
    x, scale, _, relu = inputs
    ctx.relu = relu
    # The output only for ReLU's mask.
    ctx.save_for_backward(x, scale, output if relu else None)


def _backward(ctx, grad_out):
    x, scale, out = ctx.saved_tensors
    need_x, need_scale, need_residual = ctx.needs_input_grad[:3]
    grad_x, grad_scale, grad_pre = _BACKWARD_OP(grad_out, out if ctx.relu else x, x, scale, ctx.relu)
    return (grad_x if need_x else None, grad_scale if need_scale else None,
            (grad_pre if ctx.relu else grad_out) if need_residual else None, None)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("scale_add_act: double backward (a gradient of the gradient) is not supported")


if library_loaded("_C"):
    _BACKWARD_OP = op_of("resnet_fused::scale_add_act_backward")  # looked up once, not per backward
    torch.library.register_fake("resnet_fused::scale_add_act")(_fake)
    register_autograd("resnet_fused::scale_add_act", _backward, _setup_context, differentiable_once="scale_add_act")
    torch.library.register_fake("resnet_fused::scale_add_act_backward")(_fake_backward)
    torch.library.register_autograd("resnet_fused::scale_add_act_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
