"""rf.conv_bn_act: conv2d + per-channel bias (a folded BatchNorm) + optional residual + optional ReLU."""
import torch
import torch.nn.functional as F

from .. import reference
from .._library import library_loaded
from ..backends import resolve_backend
from ._checks import CheckCache, call_signature, check_same_device, check_same_dtype, check_shape, check_tensor, pair
from ._eager_autograd import eager, register_autograd
from ._layout import dense, empty_output, output_memory_format


def _resolve_padding(padding, weight, stride, dilation):
    """(symmetric padding pair, extra) for an int, a pair, 'valid' or 'same'; `extra` (see pad_extra) is the
    [left, right, top, bottom] padding F.pad adds to x for a 'same' whose total padding is odd, one more row or
    column at the end, as F.conv2d does; None otherwise."""
    if not isinstance(padding, str):
        return pair(padding, "padding", 0), None
    if padding == "valid":
        return (0, 0), None
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    extra = [0, totals[1] % 2, 0, totals[0] % 2]
    return (totals[0] // 2, totals[1] // 2), extra if any(extra) else None


def pad_extra(x, extra):
    """x padded by `extra` from check_conv_geometry (x itself for None), in x's memory format."""
    if extra is None:
        return x
    return F.pad(x, extra).contiguous(memory_format=output_memory_format(x))


def conv_output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """The output shape of conv2d of an input of shape x_shape with a weight of shape weight_shape."""
    (kh, kw), (h, w) = weight_shape[2:], x_shape[2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x_shape[0], weight_shape[0], ho, wo


def conv_bn_act(x, weight, bias=None, residual=None, *, stride=1, padding=0, dilation=1, groups=1, relu=True,
                backend=None):
    """act(conv2d(x, weight, stride, padding, dilation, groups) + bias[c] + residual) in one op.

    `bias` is usually a folded BatchNorm (see `fold_bn`); `residual` has the output's shape; `relu`
    switches the ReLU. NCHW and channels_last inputs; the output follows the input's memory format.
    `backend` picks the implementation (see `available_backends`); None picks the default for the device.
    """
    x, stride, padding, dilation = _checked(x, weight, bias, residual, stride, padding, dilation, groups)
    name = resolve_backend("conv_bn_act", backend, x.device, x.dtype)
    x = dense(x)
    if name == "reference":
        out = reference.conv_bn_act(x, weight, bias, residual, stride, padding, dilation, groups, relu)
        return out.contiguous(memory_format=output_memory_format(x))
    ops = torch.ops.resnet_fused
    op = ops.conv_bn_act_triton.default if name == "triton" else ops.conv_bn_act.default
    return eager(op)(x, weight, bias, residual, list(stride), list(padding), list(dilation), groups, relu)


def plain_conv(x, weight, bias, *, stride, padding, dilation, groups, backend):
    """conv2d(x, weight, bias) alone, in x's memory format, for the training paths (whose BN runs apart): on the
    cpu backend ATen's convolution, which makes the oneDNN call conv_bn_act would make with no epilogue to fuse,
    without conv_bn_act's Python argument checks and Python autograd.Function (microseconds a call, paid per conv
    in a training step): with a gradient to record, the conv_training op (its autograd node C++, see there), else
    F.conv2d; on other backends conv_bn_act with no epilogue. The arguments are a module's own, already valid."""
    if resolve_backend("conv_bn_act", backend, x.device, x.dtype) == "cpu":
        if (bias is None and not isinstance(padding, str) and torch.is_grad_enabled()
                and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling()
                and not torch.compiler.is_exporting() and not torch._C._are_functorch_transforms_active()):
            # The same convolution with a C++ autograd node whose backward takes the weight gradient over a small
            # output plane as one matmul (csrc/conv_weight_grad.h: up to 4x faster there than ATen's).
            return torch.ops.resnet_fused.conv_training.default(x, weight, stride, padding, dilation, groups)
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return out.contiguous(memory_format=output_memory_format(x))
    return conv_bn_act(x, weight, bias, None, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       relu=False, backend=backend)


def conv_bn_act_into_residual(x, weight, bias, residual, *, stride=1, padding=0, dilation=1, groups=1, relu=True):
    """`conv_bn_act` on the cpu backend, written into `residual`'s own memory, which is returned: for a caller
    that owns `residual` (nothing reads it afterwards) and needs no gradient, such as a ResNet's blocks in
    inference. It saves the copy of the residual that oneDNN's in-place residual add otherwise needs (one
    read and one write of the block's output, per block). `residual` must have x's dtype and be contiguous
    in x's memory format."""
    x, stride, padding, dilation = _checked(x, weight, bias, residual, stride, padding, dilation, groups)
    if residual is None:
        raise ValueError("conv_bn_act_into_residual: residual is the output buffer, got None")
    if x.device.type != "cpu":
        raise ValueError(f"conv_bn_act_into_residual runs on the cpu backend only, got tensors on {x.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        raise RuntimeError("conv_bn_act_into_residual has no gradient: call it under torch.no_grad() or with "
                           "tensors that do not require grad")
    torch.ops.resnet_fused.conv_bn_act_into_residual.default(dense(x), weight, bias, residual, list(stride),
                                                             list(padding), list(dilation), groups, relu)
    return residual


def _check_arguments(x, weight, bias, residual, stride, padding, dilation, groups):
    """The argument checks of conv_bn_act: (stride, padding, dilation, extra), see check_conv_geometry."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4)
    if bias is not None:
        check_tensor(bias, "bias", 1)
    if residual is not None:
        check_tensor(residual, "residual", 4)
    check_same_dtype(x, "x", weight=weight, bias=bias, residual=residual)
    check_same_device(x, "x", weight=weight, bias=bias, residual=residual)
    stride, padding, dilation, extra, out_shape = check_conv_geometry(x, weight, stride, padding, dilation, groups)
    check_shape(bias, "bias", (out_shape[1],))
    check_shape(residual, "residual", out_shape)
    return stride, padding, dilation, extra


_CHECKS = CheckCache(_check_arguments)


def _checked(x, weight, bias, residual, stride, padding, dilation, groups):
    """(x, stride, padding, dilation) after the checks (once per call signature), x padded for an asymmetric
    padding='same'."""
    tensors = (x, weight, bias, residual)
    stride, padding, dilation, extra = _CHECKS(call_signature(tensors, stride, padding, dilation, groups), *tensors,
                                               stride, padding, dilation, groups)
    return pad_extra(x, extra), stride, padding, dilation


def check_conv_geometry(x, weight, stride, padding, dilation, groups):
    """Checks the conv arguments against x and weight (4-D tensors): (stride, padding, dilation, extra, output
    shape), the pairs resolved; `extra` the padding an asymmetric padding='same' adds to x (see pad_extra), the
    output shape that of the padded x."""
    stride, dilation = pair(stride, "stride", 1), pair(dilation, "dilation", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_in, (c_out, c_per_group) = x.shape[1], weight.shape[:2]
    if c_in != c_per_group * groups:
        raise ValueError(
            f"x has {c_in} channels, but weight of shape {tuple(weight.shape)} with groups={groups} "
            f"expects {c_per_group * groups}"
        )
    if c_out % groups:
        raise ValueError(f"weight has {c_out} output channels, not divisible by groups={groups}")
    padding, extra = _resolve_padding(padding, weight, stride, dilation)
    batch, _, height, width = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    if extra is not None:  # 'same' runs at stride 1: each row or column padded onto x is one more of the output
        height, width = height + extra[3], width + extra[1]
    if height < 1 or width < 1:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the "
            f"kernel {tuple(weight.shape[2:])} with dilation {dilation}"
        )
    return stride, padding, dilation, extra, (batch, c_out, height, width)


def _fake(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    return empty_output(x, conv_output_shape(x.shape, weight.shape, stride, padding, dilation))


def _fake_chain(x, weights, biases, geometry, residual, relu):
    shape = x.shape
    for i, weight in enumerate(weights):  # geometry: 7 ints a convolution, see the schema (csrc/ops.cpp)
        g = geometry[7 * i:7 * i + 7]
        shape = conv_output_shape(shape, weight.shape, g[0:2], g[2:4], g[4:6])
    return empty_output(x, shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu = relu


def _backward(ctx, grad):
    # The epilogue's gradient, then PyTorch's own convolution backward.
    x, weight, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    grad_pre = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
    need_x, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
    grad_x = grad_weight = grad_bias = None
    if need_x or need_weight:
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_pre, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_x, need_weight, False],
        )
    if need_bias:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_bias = grad_pre.sum((0, 2, 3), dtype=acc).to(grad.dtype)
    return grad_x, grad_weight, grad_bias, grad_pre if need_residual else None, None, None, None, None, None


def register_formulas(qualname: str) -> None:
    """Fake kernel and autograd for a conv_bn_act op (the C++ one or a backend's custom op)."""
    torch.library.register_fake(qualname)(_fake)
    register_autograd(qualname, _backward, _setup_context)


if library_loaded("_C"):
    register_formulas("resnet_fused::conv_bn_act")
    torch.library.register_fake("resnet_fused::conv_bn_act_chain")(_fake_chain)
    # Mutate their residual and return nothing: nothing to fake but the absence of an output.
    torch.library.register_fake("resnet_fused::conv_bn_act_into_residual")(lambda *args: None)
    torch.library.register_fake("resnet_fused::conv_bn_act_chain_into_residual")(lambda *args: None)
