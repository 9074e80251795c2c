"""rf.bn_act: batch norm + optional residual add + optional ReLU, training and eval."""
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .. import reference
from .._library import library_loaded
from ..backends import resolve_backend
from ._checks import CheckCache, call_signature, check_same_device, check_same_dtype, check_shape, check_tensor
from ._eager_autograd import eager, op_of, register_autograd
from ._layout import dense, empty_output, output_memory_format
from .sync_bn import SyncBNAct

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _param_dtype(x, params: dict) -> torch.dtype:
    """The dtype shared by weight, bias and the running statistics: x's, or float32 for a float16/bfloat16
    x, as PyTorch's batch norm accepts under autocast."""
    given = {name: t.dtype for name, t in params.items() if t is not None}
    if len(set(given.values())) > 1:
        raise TypeError(f"weight, bias, running_mean and running_var must share one dtype, got {given}")
    dtype = next(iter(given.values()), x.dtype if x.dtype not in _LOW_PRECISION else torch.float32)
    if dtype != x.dtype and not (x.dtype in _LOW_PRECISION and dtype == torch.float32):
        raise TypeError(
            f"the BN parameters have dtype {dtype} but x has {x.dtype}; they must match, or be float32 "
            f"for a float16/bfloat16 x"
        )
    return dtype


def _filled(t, channels: int, fill: float, dtype: torch.dtype, device) -> torch.Tensor:
    """t, or a (channels,) tensor of `fill` standing in for an absent BN parameter or running statistic."""
    return t if t is not None else torch.full((channels,), fill, dtype=dtype, device=device)


def _check_tensors(x, weight, bias, running_mean, running_var, residual, training: bool, local: bool) -> torch.dtype:
    """bn_act's checks of its tensors; returns the BN parameters' dtype (see _param_dtype). `local`: the batch
    statistics are x's own (no process group), so training needs more than one value per channel in x."""
    check_tensor(x, "x", 4)
    channels = x.shape[1]
    params = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, t in params.items():
        if t is not None:
            check_tensor(t, name, 1)
            check_shape(t, name, (channels,))
    if residual is not None:
        check_tensor(residual, "residual", 4)
        check_shape(residual, "residual", x.shape)
    check_same_dtype(x, "x", residual=residual)
    param_dtype = _param_dtype(x, params)
    check_same_device(x, "x", residual=residual, **params)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")
    if training and local and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    return param_dtype


_CHECKS = CheckCache(_check_tensors)


def backend_ops(name: str):
    """The (bn_act, bn_act_backward) op overloads of a backend with bn_act kernels (cpu, cuda: the C++ ops;
    triton)."""
    ops = torch.ops.resnet_fused
    if name == "triton":
        return ops.bn_act_triton.default, ops.bn_act_backward_triton.default
    return ops.bn_act.default, ops.bn_act_backward.default


def bn_act(x, weight, bias, running_mean, running_var, residual=None, *, training, momentum=0.1, eps=1e-5,
           relu=True, process_group=None, backend=None):
    """act(batch_norm(x) + residual), in one op.

    training=True normalizes with the batch statistics and updates running_mean/running_var in place
    exactly as F.batch_norm does (momentum, unbiased variance); training=False uses the running
    statistics. weight/bias may be None (no affine); running statistics may be None in training only.
    Differentiable with respect to x, weight, bias and residual.

    process_group (a torch.distributed group, or dist.group.WORLD) synchronizes the batch statistics in
    training across its processes, as nn.SyncBatchNorm does; it needs an initialized process group.
    """
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if momentum is None:
        raise ValueError(
            "momentum=None (a cumulative moving average) needs the batch count: pass "
            "momentum=1/num_batches_tracked, as nn.BatchNorm2d does"
        )
    tensors = (x, weight, bias, running_mean, running_var, residual)
    local = process_group is None
    param_dtype = _CHECKS(call_signature(tensors, training, local), *tensors, training, local)
    channels = x.shape[1]
    if training and process_group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs an initialized torch.distributed process group")
        weight = weight if weight is not None else torch.ones(channels, dtype=param_dtype, device=x.device)
        bias = bias if bias is not None else torch.zeros(channels, dtype=param_dtype, device=x.device)
        return SyncBNAct.apply(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu,
                               process_group, backend)
    name = resolve_backend("bn_act", backend, x.device, x.dtype)
    if name in ("cpu", "cuda") and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                                        or torch._C._are_functorch_transforms_active()):
        # The C++ ops' eager path in one call (csrc/bn_act_autograd.cpp): the op on dense copies of x and residual
        # where they need one, its autograd node in C++ when a gradient is needed, and the running statistics'
        # update. A Python autograd.Function costs tens of microseconds a call more. torch.compile and
        # torch.export trace the op and its registered formulas below; torch.func transforms take no C++ node.
        weight = _filled(weight, channels, 1.0, param_dtype, x.device)
        bias = _filled(bias, channels, 0.0, param_dtype, x.device)
        return torch.ops.resnet_fused.bn_act_autograd.default(x, weight, bias, residual, running_mean, running_var,
                                                              training, float(momentum), float(eps), relu)
    x = dense(x)
    residual = dense(residual) if residual is not None else None
    if name == "reference":
        out = reference.bn_act(x, weight, bias, running_mean, running_var, residual, training=training,
                               momentum=momentum, eps=eps, relu=relu)
        return out.contiguous(memory_format=output_memory_format(x))

    def param(t, fill):
        return _filled(t, channels, fill, param_dtype, x.device)

    out, _, _, new_mean, new_var = eager(backend_ops(name)[0])(
        x, param(weight, 1.0), param(bias, 0.0), residual, param(running_mean, 0.0), param(running_var, 1.0),
        training, float(momentum), float(eps), relu,
    )
    if training and running_mean is not None:
        # Under no_grad only where a copy would be recorded (the context costs microseconds a call): the eager
        # caller marks new_mean and new_var non-differentiable, but traced with the registered formulas
        # (torch.compile) they require grad.
        recorded = any(t.requires_grad for t in (running_mean, running_var, new_mean, new_var))
        with torch.no_grad() if recorded else nullcontext():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out


def _fake(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu):
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    return (
        empty_output(x, x.shape),
        x.new_empty((channels,), dtype=stats),
        x.new_empty((channels,), dtype=stats),
        torch.empty_like(running_mean),
        torch.empty_like(running_var),
    )


def _fake_backward(grad_out, out, x, weight, save_mean, save_invstd, training, relu, need_grad_pre=True):
    return (
        empty_output(x, x.shape),
        torch.empty_like(weight),
        torch.empty_like(weight),
        empty_output(x, x.shape) if need_grad_pre else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu = inputs
    out, save_mean, save_invstd, _, _ = output
    # The output only for ReLU's mask: without ReLU (a downsample branch) keeping it would hold one more
    # activation until the backward, which the gradient kernels do not read.
    ctx.save_for_backward(x, weight, save_mean, save_invstd, out if relu else None)
    ctx.training, ctx.relu = training, relu


def _backward_with(backward_op):
    """The autograd backward of a bn_act op whose gradient kernel is `backward_op` (same backend)."""
    def backward(ctx, grad_out, *unused_grads):
        return _backward(ctx, grad_out, backward_op)
    return backward


def _backward(ctx, grad_out, backward_op):
    if grad_out is None:  # no gradient reached the output (the eager caller does not materialize zeros)
        return (None,) * 10
    x, weight, save_mean, save_invstd, out = ctx.saved_tensors
    need_x, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
    # Without ReLU the residual's gradient is grad_out itself (as for PyTorch's add): no copy asked of the op.
    grad_x, grad_weight, grad_bias, grad_pre = backward_op(
        grad_out, out if ctx.relu else x, x, weight, save_mean, save_invstd, ctx.training, ctx.relu,
        need_residual and ctx.relu
    )
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        (grad_pre if ctx.relu else grad_out) if need_residual else None,
        None, None, None, None, None, None,
    )


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("bn_act: double backward (a gradient of the gradient) is not supported")


def register_formulas(qualname: str, backward_qualname: str) -> None:
    """Fake kernels and autograd for a bn_act op and its gradient op (the C++ pair or a backend's
    custom ops): the gradient op's result is the bn_act op's backward."""
    torch.library.register_fake(qualname)(_fake)
    register_autograd(qualname, _backward_with(op_of(backward_qualname)), _setup_context, differentiable_once="bn_act")
    torch.library.register_fake(backward_qualname)(_fake_backward)
    torch.library.register_autograd(backward_qualname, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


if library_loaded("_C"):
    register_formulas("resnet_fused::bn_act", "resnet_fused::bn_act_backward")
