"""conv2d(relu(batch_norm(x))) in training, keeping x instead of relu(batch_norm(x)) for the backward.

Inside a ResNet block, conv -> BN -> ReLU -> conv. Run as separate ops (eager PyTorch, or bn_act and then a
conv), autograd keeps both the BN input x (BN's backward needs it) and the ReLU output y (the next conv's
backward needs its input, and ReLU's mask is read from y) until the backward. y is a function of x and the
per-channel batch statistics, so this op keeps x and the statistics only and recomputes y in the backward
with one elementwise pass: one activation-sized tensor less per BN + ReLU inside a block, for one extra read
of x and write of y during the backward. The blocks use it in training (resnet_fused/nn/fused.py); under
torch.compile they do not, since the compiler's partitioner makes its own recompute choices.

The BN runs on the chosen backend's fused training kernel (statistics, normalize, ReLU); the gradient on its
backward kernel. The reference backend and synchronized BN (process_group) compute the statistics and the
gradient sums with PyTorch (resnet_fused/ops/sync_bn.py), and normalize with the backend's eval-mode pass.
"""
import torch

from ..backends import resolve_backend
from ._layout import dense, output_memory_format
from .bn_act import bn_act
from .conv_bn_act import conv_bn_act
from .sync_bn import batch_stats, bn_backward


def _ops_for(backend: str):
    """The (training forward, backward) op pair of a backend with bn_act kernels."""
    ops = torch.ops.resnet_fused
    if backend == "triton":
        return ops.bn_act_triton, ops.bn_act_backward_triton
    return ops.bn_act, ops.bn_act_backward


def _filled(t, channels, fill, like):
    return t if t is not None else torch.full((channels,), fill, dtype=like.dtype, device=like.device)


class BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, conv_weight, running_mean, running_var, momentum, eps, conv_args,
                group, backend):
        channels = x.shape[1]
        name = resolve_backend("bn_act", backend, x.device, x.dtype)
        x = dense(x)
        stats_like = torch.empty(0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                                 device=x.device)
        if group is not None or name == "reference":
            mean, var, total = batch_stats(x, running_mean, running_var, momentum, group)
            # Normalizing with the batch statistics is eval mode's math: one pass on the backend.
            cast = lambda t: None if t is None else t.to(mean.dtype)  # noqa: E731
            y = bn_act(x, cast(bn_weight), cast(bn_bias), mean, var, training=False, eps=eps, relu=True,
                       backend=backend)
            invstd = torch.rsqrt(var + eps)
        else:
            forward_op, _ = _ops_for(name)
            params = bn_weight if bn_weight is not None else (bn_bias if bn_bias is not None else running_mean)
            like = params if params is not None else stats_like
            y, mean, invstd, new_mean, new_var = forward_op(
                x, _filled(bn_weight, channels, 1.0, like), _filled(bn_bias, channels, 0.0, like), None,
                _filled(running_mean, channels, 0.0, like), _filled(running_var, channels, 1.0, like),
                True, float(momentum), float(eps), True,
            )
            if running_mean is not None:
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
            total = None
        out = conv_bn_act(y, conv_weight, None, None, **conv_args, relu=False, backend=backend)
        ctx.save_for_backward(x, bn_weight, bn_bias, conv_weight, mean, invstd, total)
        ctx.conv_args, ctx.group, ctx.backend_name = conv_args, group, name
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bn_weight, bn_bias, conv_weight, mean, invstd, total = ctx.saved_tensors
        channels, shape = x.shape[1], (1, -1, 1, 1)
        weight = _filled(bn_weight, channels, 1.0, mean)
        bias = _filled(bn_bias, channels, 0.0, mean)
        # The ReLU output, recomputed from x and the batch statistics in the statistics' precision.
        scale = (weight.to(mean.dtype) * invstd).reshape(shape)
        shift = bias.to(mean.dtype).reshape(shape) - mean.reshape(shape) * scale
        y = torch.relu(x.to(mean.dtype) * scale + shift).to(x.dtype).contiguous(
            memory_format=output_memory_format(x))
        args = ctx.conv_args
        need_x, need_bn_weight, need_bn_bias, need_conv_weight = ctx.needs_input_grad[:4]
        grad_y, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, y, conv_weight, None, list(args["stride"]), list(args["padding"]), list(args["dilation"]),
            False, [0, 0], args["groups"], [True, need_conv_weight, False],
        )
        if ctx.group is not None or ctx.backend_name == "reference":
            grad_x, grad_weight, grad_bias, _ = bn_backward(grad_y, y, x, weight, mean, invstd, total, True,
                                                            ctx.group)
        else:
            _, backward_op = _ops_for(ctx.backend_name)
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
