"""rf.conv_stats: a convolution whose input is the previous BatchNorm + ReLU applied on load (the prologue)
and whose output comes with its own per-channel batch statistics (the epilogue), so a training step needs no
separate BN passes (NVIDIA's "NormConvolution"/"genstats" pattern; the blocks in resnet_fused/nn use it)."""
import torch

from .. import reference
from .._library import library_loaded
from ..backends import resolve_backend
from ._checks import check_same_device, check_same_dtype, check_shape, check_tensor
from ._eager_autograd import eager, register_autograd
from ._layout import dense, empty_output, output_memory_format
from .conv_bn_act import check_conv_geometry, conv_output_shape, pad_extra

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stats_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics, of the prologue's arithmetic and of the 16-bit conv's accumulator."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def conv_stats(x, weight, scale=None, shift=None, *, relu=True, stride=1, padding=0, dilation=1, groups=1,
               backend=None):
    """(y, mean, var) with y = conv2d(z, weight, stride, padding, dilation, groups), no bias, in x's dtype and
    memory format, where z = relu(x * scale[c] + shift[c]) (no ReLU for relu=False; z = x without scale and
    shift) and padded positions of z are 0; mean and var are y's per-channel mean and biased variance over
    N, H, W, taken before y is rounded, in float32 (float64 for a float64 x).

    scale and shift (1-D, C_in) come together, in x's dtype or float32 for a float16/bfloat16 x.
    Differentiable in x, weight, scale and shift, with gradients from all three outputs.
    """
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4)
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (or neither, for no prologue)")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(t, name, 1)
            check_shape(t, name, (x.shape[1],))
    check_same_dtype(x, "x", weight=weight)
    if scale is not None:
        check_same_dtype(scale, "scale", shift=shift)
        if scale.dtype != x.dtype and not (x.dtype in _LOW_PRECISION and scale.dtype == torch.float32):
            raise TypeError(f"scale and shift have dtype {scale.dtype} but x has {x.dtype}; they must match, "
                            f"or be float32 for a float16/bfloat16 x")
    check_same_device(x, "x", weight=weight, scale=scale, shift=shift)
    stride, padding, dilation, extra, _ = check_conv_geometry(x, weight, stride, padding, dilation, groups)
    if extra is not None and scale is not None:
        # The prologue would turn the zeros padded onto x into relu(shift); the padding belongs to z.
        raise ValueError("padding='same' here pads asymmetrically, which conv_stats with scale and shift does "
                         "not take: pass integer padding")
    x = pad_extra(x, extra)

    name = resolve_backend("conv_stats", backend, x.device, x.dtype)
    x = dense(x)
    if name == "reference":
        y, mean, var = reference.conv_stats(x, weight, scale, shift, stride, padding, dilation, groups, relu)
        return y.contiguous(memory_format=output_memory_format(x)), mean, var
    ops = torch.ops.resnet_fused
    op = ops.conv_stats_triton.default if name == "triton" else ops.conv_stats.default
    return eager(op)(x, weight, scale, shift, list(stride), list(padding), list(dilation), groups, relu)


def _fake(x, weight, scale, shift, stride, padding, dilation, groups, relu):
    c_out, dtype = weight.shape[0], stats_dtype(x.dtype)
    return (empty_output(x, conv_output_shape(x.shape, weight.shape, stride, padding, dilation)),
            x.new_empty((c_out,), dtype=dtype), x.new_empty((c_out,), dtype=dtype))


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, stride, padding, dilation, groups, relu = inputs
    y, mean, _ = output
    # z is recomputed in the backward, not kept. y is kept for var's gradient: in a block the next conv_stats
    # (or the block's exit) keeps it anyway, so it costs no memory there.
    ctx.save_for_backward(x, weight, scale, shift, y, mean)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu = relu


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, scale, shift, y, mean = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need_x, need_weight, need_scale, need_shift = ctx.needs_input_grad[:4]
    dtype, shape = mean.dtype, (1, -1, 1, 1)
    count = y.numel() // y.shape[1]
    # The accumulator's gradient: from y, and from the statistics (d mean = 1/n, d var = 2 (y - mean) / n).
    grad_acc = grad_y.to(dtype) if grad_y is not None else torch.zeros_like(y, dtype=dtype)
    if grad_mean is not None:
        grad_acc = grad_acc + (grad_mean / count).reshape(shape)
    if grad_var is not None:
        grad_acc = grad_acc + (grad_var * 2).reshape(shape) * (y.to(dtype) - mean.reshape(shape)) / count
    grad_acc = grad_acc.to(x.dtype)

    pre = None
    if scale is not None:  # recompute z
        pre = x.to(dtype) * scale.to(dtype).reshape(shape) + shift.to(dtype).reshape(shape)
        z = (pre.relu() if ctx.relu else pre).to(x.dtype)
    else:
        z = x
    need_z = need_x or need_scale or need_shift
    grad_z = grad_weight = None
    if need_z or need_weight:
        grad_z, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_acc, z, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_z, need_weight, False])
    if pre is None:
        return grad_z, grad_weight, None, None, None, None, None, None, None
    grad_x = grad_scale = grad_shift = None
    if need_z:
        grad_pre = grad_z.to(dtype)
        if ctx.relu:
            grad_pre = torch.ops.aten.threshold_backward(grad_pre, pre, 0)
        if need_x:
            grad_x = (grad_pre * scale.to(dtype).reshape(shape)).to(x.dtype)
        if need_scale:
            grad_scale = (grad_pre * x.to(dtype)).sum((0, 2, 3)).to(scale.dtype)
        if need_shift:
            grad_shift = grad_pre.sum((0, 2, 3)).to(shift.dtype)
    return grad_x, grad_weight, grad_scale, grad_shift, None, None, None, None, None


def register_formulas(qualname: str) -> None:
    """Fake kernel and autograd for a conv_stats op (the C++ one or a backend's custom op)."""
    torch.library.register_fake(qualname)(_fake)
    register_autograd(qualname, _backward, _setup_context, differentiable_outputs=3)


def bn_add_relu(y, scale, shift, residual=None, residual_scale=None, residual_shift=None, *, backend):
    """relu(y * scale[c] + shift[c] + residual'), residual' = residual * residual_scale[c] + residual_shift[c]
    (a downsample branch's BN) or residual: the exit of a block training on conv_stats, and the ReLU output the
    recomputing training ops rebuild, in y's dtype and layout. One pass on the triton and cpu backends (computed
    in y's accumulation type there); PyTorch ops on the others. `backend` is the caller's resolved one; the
    arguments are the callers' own (not checked again)."""
    if backend in ("triton", "cpu"):
        ops = torch.ops.resnet_fused
        op = ops.bn_add_relu_triton.default if backend == "triton" else ops.bn_add_relu.default
        return eager(op)(y, scale, shift, residual, residual_scale, residual_shift)
    shape = (1, -1, 1, 1)
    out = torch.addcmul(shift.reshape(shape), y, scale.reshape(shape))
    if residual_scale is not None:
        out = out + torch.addcmul(residual_shift.reshape(shape), residual, residual_scale.reshape(shape))
    elif residual is not None:
        out = out + residual
    return out.relu_().to(y.dtype)


def _fake_bn_add_relu(y, scale, shift, residual, residual_scale, residual_shift):
    return empty_output(y, y.shape)


def _setup_bn_add_relu(ctx, inputs, output):
    y, scale, shift, residual, residual_scale, residual_shift = inputs
    ctx.save_for_backward(y, scale, residual, residual_scale, output)  # the output for ReLU's mask


def _backward_bn_add_relu(ctx, grad):
    y, scale, residual, residual_scale, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    dtype, shape, dims = scale.dtype, (1, -1, 1, 1), (0, 2, 3)
    grad_pre = torch.ops.aten.threshold_backward(grad, out, 0).to(dtype)
    grad_y = (grad_pre * scale.reshape(shape)).to(y.dtype) if need[0] else None
    grad_scale = (grad_pre * y.to(dtype)).sum(dims) if need[1] else None
    grad_shift = grad_pre.sum(dims) if need[2] or need[5] else None
    grad_residual = grad_residual_scale = None
    if residual_scale is None:
        grad_residual = grad_pre.to(residual.dtype) if need[3] else None
    else:
        grad_residual = (grad_pre * residual_scale.reshape(shape)).to(residual.dtype) if need[3] else None
        grad_residual_scale = (grad_pre * residual.to(dtype)).sum(dims) if need[4] else None
    return (grad_y, grad_scale, grad_shift if need[2] else None, grad_residual, grad_residual_scale,
            grad_shift if need[5] else None)


def register_bn_add_relu_formulas(qualname: str) -> None:
    """Fake kernel and autograd for a backend's bn_add_relu op."""
    torch.library.register_fake(qualname)(_fake_bn_add_relu)
    register_autograd(qualname, _backward_bn_add_relu, _setup_bn_add_relu)


if library_loaded("_C"):
    register_formulas("resnet_fused::conv_stats")
    register_bn_add_relu_formulas("resnet_fused::bn_add_relu")
