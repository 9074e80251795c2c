"""conv2d(relu(batch_norm(x))) in training, keeping x instead of relu(batch_norm(x)) for the backward.

Inside a ResNet block, conv -> BN -> ReLU -> conv. Run as separate ops (eager PyTorch, or bn_act and then a
conv), autograd keeps both the BN input x (BN's backward needs it) and the ReLU output y (the next conv's
backward needs its input, and ReLU's mask is read from y) until the backward. y is a function of x and the
per-channel batch statistics, so this op keeps x and the statistics only and recomputes y in the backward
with one elementwise pass: one activation-sized tensor less per BN + ReLU inside a block, for one extra read
of x and write of y during the backward. The blocks use it in training (resnet_fused/nn/fused.py); under
torch.compile they do not, since the compiler's partitioner makes its own recompute choices.

The BN runs on the chosen backend's fused training kernel (statistics, normalize, ReLU) and its gradient on
the backend's backward kernel; synchronized BN (process_group) computes the statistics and the gradient sums
with PyTorch (resnet_fused/ops/sync_bn.py) and normalizes with the backend's eval-mode pass. No double
backward, as for the fused backends' bn_act. The reference backend is not taken: it stays plain PyTorch
(double backward included), so blocks on it keep what eager keeps.
"""
import torch

from ..backends import resolve_backend
from ._layout import dense, output_memory_format
from ._no_double_backward import differentiable_once
from .bn_act import bn_act
from .conv_bn_act import conv_bn_act
from .sync_bn import batch_stats, bn_backward


def _ops_for(backend: str):
    """The (training forward, backward) op pair of a backend with bn_act kernels."""
    ops = torch.ops.resnet_fused
    if backend == "triton":
        return ops.bn_act_triton, ops.bn_act_backward_triton
    return ops.bn_act, ops.bn_act_backward


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _filled(t, channels, fill, like):
    return t if t is not None else torch.full((channels,), fill, dtype=like.dtype, device=like.device)


class BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, conv_weight, running_mean, running_var, momentum, eps, conv_args,
                group, backend):
        channels = x.shape[1]
        if group is None and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        name = resolve_backend("bn_act", backend, x.device, x.dtype)
        x = dense(x)
        total = None
        if group is not None:
            mean, var, total = batch_stats(x, running_mean, running_var, momentum, group)
            # Normalizing with the global batch statistics is eval mode's math: one pass on the backend.
            cast = lambda t: None if t is None else t.to(mean.dtype)  # noqa: E731
            y = bn_act(x, cast(bn_weight), cast(bn_bias), mean, var, training=False, eps=eps, relu=True,
                       backend=backend)
            invstd = torch.rsqrt(var + eps)
        elif name == "reference":
            raise ValueError("bn_relu_conv runs the fused backends' BN kernels; the reference backend is plain "
                             "PyTorch (batch_norm, relu, conv2d), which the blocks use as it is")
        else:
            forward_op, _ = _ops_for(name)
            like = next((t for t in (bn_weight, bn_bias, running_mean) if t is not None), None)
            like = like if like is not None else torch.empty(0, dtype=_stats_dtype(x), device=x.device)
            y, mean, invstd, new_mean, new_var = forward_op(
                x, _filled(bn_weight, channels, 1.0, like), _filled(bn_bias, channels, 0.0, like), None,
                _filled(running_mean, channels, 0.0, like), _filled(running_var, channels, 1.0, like),
                True, float(momentum), float(eps), True,
            )
            if running_mean is not None:
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        out = conv_bn_act(y, conv_weight, None, None, **conv_args, relu=False, backend=backend)
        # Not the running statistics: later forwards update them in place, before this backward may run.
        ctx.save_for_backward(x, bn_weight, bn_bias, conv_weight, mean, invstd, total)
        ctx.conv_args, ctx.group, ctx.backend_name = conv_args, group, name
        ctx.param_dtype = next((t.dtype for t in (bn_weight, bn_bias, running_mean) if t is not None), mean.dtype)
        return out

    @staticmethod
    @differentiable_once("bn_relu_conv")  # the statistics are saved as constants
    def backward(ctx, grad_out):
        x, bn_weight, bn_bias, conv_weight, mean, invstd, total = ctx.saved_tensors
        channels, shape = x.shape[1], (1, -1, 1, 1)
        # The ReLU output, recomputed from x and the batch statistics in the statistics' precision.
        scale = invstd if bn_weight is None else bn_weight.to(mean.dtype) * invstd
        shift = -mean * scale if bn_bias is None else bn_bias.to(mean.dtype) - mean * scale
        y = torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).relu_().to(x.dtype).contiguous(
            memory_format=output_memory_format(x))
        args = ctx.conv_args
        need_x, need_bn_weight, need_bn_bias, need_conv_weight = ctx.needs_input_grad[:4]
        grad_y, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, y, conv_weight, None, list(args["stride"]), list(args["padding"]), list(args["dilation"]),
            False, [0, 0], args["groups"], [need_x or need_bn_weight or need_bn_bias, need_conv_weight, False],
        )
        grad_x = grad_weight = grad_bias = None
        if need_x or need_bn_weight or need_bn_bias:
            if ctx.group is not None:
                weight = bn_weight if bn_weight is not None else torch.ones_like(mean)
                grad_x, grad_weight, grad_bias, _ = bn_backward(grad_y, y, x, weight, mean, invstd, total, True,
                                                                ctx.group)
            else:
                _, backward_op = _ops_for(ctx.backend_name)
                weight = bn_weight if bn_weight is not None else mean.new_ones(channels, dtype=ctx.param_dtype)
                grad_x, grad_weight, grad_bias, _ = backward_op(grad_y, y, x, weight, mean, invstd, True, True)
        return (
            grad_x if need_x else None,
            grad_weight if need_bn_weight and bn_weight is not None else None,
            grad_bias if need_bn_bias and bn_bias is not None else None,
            grad_conv_weight if need_conv_weight else None,
            None, None, None, None, None, None, None,
        )


def bn_relu_conv(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, *, momentum, eps, stride, padding,
                 dilation, groups, process_group=None, backend=None):
    """conv2d(relu(batch_norm(x, training=True)), conv_weight): batch statistics, running statistics updated
    in place (momentum, unbiased variance), no bias or residual on the conv. Saves x, not the ReLU output.
    Arguments as rf.bn_act and rf.conv_bn_act; differentiable in x, the BN parameters and conv_weight."""
    conv_args = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return BNReLUConv.apply(x, bn_weight, bn_bias, conv_weight, running_mean, running_var, momentum, eps,
                            conv_args, process_group, backend)
