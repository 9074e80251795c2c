"""conv2d(relu(batch_norm(x))), max_pool2d(relu(batch_norm(x))) and a Bottleneck's tail
relu(batch_norm(conv2d(relu(batch_norm(x)))) + shortcut) in training, keeping x instead of relu(batch_norm(x))
for the backward.

Inside a ResNet block, conv -> BN -> ReLU -> conv; in the stem, conv -> BN -> ReLU -> max pool. Run as
separate ops (eager PyTorch, or bn_act and then the next op), autograd keeps the BN input x (BN's backward
needs it) and the ReLU output y (the next conv's backward needs its input, the max pool keeps int64
indices into it, and ReLU's mask is read from y) until the backward. y is a function of x and the
per-channel batch statistics, so these ops keep x and the statistics only and recompute y in the backward
with one elementwise pass (and, for the pool, the pool's argmax with one more pass): one activation-sized
tensor less per BN + ReLU inside a block, and in the stem the ReLU output and the pool's indices (in bf16
the indices are four times the pool output's size). The blocks and the stem use them in training
(resnet_fused/nn/fused.py, models/resnet.py); under torch.compile they do not, since the compiler's
partitioner makes its own recompute choices.

A block's last conv and BN (+ shortcut, ReLU) run in the op of the BN + ReLU before them (`ConvBNActNext`):
one autograd node for what would be two. With `low_memory` (a Bottleneck's) it goes one further: it keeps
BN2's input and the block output only and recomputes conv3's output in the backward: one more activation (4x
the inner width) less per Bottleneck, for one more 1x1 conv (about 8% of a Bottleneck's training FLOPs).

On the cpu backend (in eager, without synchronized statistics) each op is one C++ op whose autograd node is C++
(csrc/recomputed_bn_relu.cpp, the same steps as BNReLUThen below): a Python autograd.Function costs tens of
microseconds a call in its own code, more once a convolution has swept the caches, and ResNet-50 makes about 35 of
these calls a training step (README, "The training step"). The other backends run BNReLUThen.

The BN runs on the chosen backend's fused training kernel (statistics, normalize, ReLU) and its gradient on
the backend's backward kernel; synchronized BN (process_group) computes the statistics and the gradient sums
with PyTorch (resnet_fused/ops/sync_bn.py) and normalizes with the backend's eval-mode pass. No double
backward, as for the fused backends' bn_act. The reference backend is not taken: it stays plain PyTorch
(double backward included), so blocks on it keep what eager keeps.
"""
import dataclasses

import torch
import torch.nn.functional as F

from ..backends import resolve_backend
from ._eager_autograd import below_autograd, cpu_node_runs
from ._layout import dense, output_memory_format
from ._no_double_backward import differentiable_once
from .bn_act import backend_ops
from .conv_bn_act import plain_conv
from .conv_stats import bn_add_relu
from .sync_bn import bn_backward, bn_forward


def _affine(x, weight, bias, running_mean):
    """(weight, bias), ones and zeros standing in for a BN without affine parameters, in the parameters' dtype
    (the running statistics', else float32, float64 for a float64 x): the kernels take both."""
    like = next((t for t in (weight, bias, running_mean) if t is not None), None)
    dtype = like.dtype if like is not None else torch.float64 if x.dtype == torch.float64 else torch.float32
    channels = x.shape[1]
    return (weight if weight is not None else torch.ones(channels, dtype=dtype, device=x.device),
            bias if bias is not None else torch.zeros(channels, dtype=dtype, device=x.device))


@dataclasses.dataclass(frozen=True)
class _BatchNorm:
    """How a training-mode BN runs inside these ops: on the backend's fused kernels, or with statistics and
    gradient sums synchronized across `group` (resnet_fused/ops/sync_bn.py). weight and bias are never None
    here (see _affine)."""
    backend: str | None
    name: str  # the resolved backend
    group: object

    def forward(self, x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
        """act(batch_norm(x) + residual) with batch statistics, running statistics updated in place:
        (out, mean, invstd, count), count None without a group."""
        if self.group is not None:
            return bn_forward(x, weight, bias, residual, running_mean, running_var, momentum, eps, relu, self.group,
                              self.backend)
        if x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
        forward_op, _ = backend_ops(self.name)
        untracked = running_mean is None  # the kernels take running statistics: give them scratch ones
        with below_autograd():  # this op's backward is ours: skip the ops' autograd wrappers
            out, mean, invstd, new_mean, new_var = forward_op(
                x, weight, bias, residual, torch.zeros_like(weight) if untracked else running_mean,
                torch.ones_like(weight) if untracked else running_var, True, float(momentum), float(eps), relu,
            )
        if not untracked:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return out, mean, invstd, None

    def backward(self, grad_out, out, x, weight, mean, invstd, total, relu, need_grad_pre):
        """(grad_x, grad_weight, grad_bias, grad_pre) of forward; grad_pre only with need_grad_pre."""
        if self.group is not None:
            return bn_backward(grad_out, out, x, weight, mean, invstd, total, relu, self.group)
        _, backward_op = backend_ops(self.name)
        with below_autograd():
            return backward_op(grad_out, out, x, weight, mean, invstd, True, relu, need_grad_pre)


def _relu_output(x, weight, bias, mean, invstd, backend: str):
    """relu(batch_norm(x)) from the saved batch statistics, in x's dtype and layout: one pass on the backends with a
    bn_add_relu kernel (see there), `backend` being the resolved one."""
    scale = weight.to(mean.dtype) * invstd
    y = bn_add_relu(x, scale, bias.to(mean.dtype) - mean * scale, backend=backend)
    return y.contiguous(memory_format=output_memory_format(x))


# The op after the ReLU. forward(y, tensors, bn) -> (out, saved): `tensors` are its differentiable inputs, `saved`
# what its backward needs; backward(grad_out, y, saved, needs, need_y, bn) -> (grad_y, a gradient or None per
# tensor). `bn` is the _BatchNorm the op runs with.

@dataclasses.dataclass(frozen=True)
class ConvNext:
    """conv2d(y, weight), no bias, on the module's backend. tensors: (weight,)."""
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def conv(self, y, weight, backend):
        return plain_conv(y, weight, None, stride=self.stride, padding=self.padding, dilation=self.dilation,
                          groups=self.groups, backend=backend)

    def conv_backward(self, grad_out, y, weight, need_y: bool, need_weight: bool):
        grad_y, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, y, weight, None, list(self.stride), list(self.padding), list(self.dilation), False, [0, 0],
            self.groups, [need_y, need_weight, False])
        return grad_y, grad_weight

    def forward(self, y, tensors, bn):
        weight, = tensors
        return self.conv(y, weight, bn.backend), (weight,)

    def backward(self, grad_out, y, saved, needs, need_y, bn):
        weight, = saved
        grad_y, grad_weight = self.conv_backward(grad_out, y, weight, need_y, needs[0])
        return grad_y, (grad_weight,)


@dataclasses.dataclass(frozen=True)
class MaxPoolNext:
    """max_pool2d(y), as nn.MaxPool2d (pairs of ints). tensors: (). Its backward recomputes the argmax with the
    same kernel as the forward, so exact ties and NaNs pick the same element. The recomputed y can differ
    from the forward's in the last bit (the two compute x * scale + shift in another order), so where the
    ReLU's input is within rounding of 0 the gradient may go to another element of the window: the ReLU's
    kink, where the gradient is a convention anyway."""
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool

    def forward(self, y, tensors, bn):
        return F.max_pool2d(y, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode), ()

    def backward(self, grad_out, y, saved, needs, need_y, bn):
        args = (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation), self.ceil_mode)
        _, indices = torch.ops.aten.max_pool2d_with_indices(y, *args)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, y, *args, indices), ()


@dataclasses.dataclass(frozen=True, eq=False)
class ConvBNActNext:
    """act(batch_norm(conv2d(y, conv_weight)) + residual) in training, keeping the output (ReLU's mask); with
    `recompute`, not the conv output, which the backward recomputes from y, and without it the conv output too
    (what the conv and bn_act would keep, in one autograd node instead of two: Python's per-node cost, see
    resnet_fused/nn/fused.py). tensors: (conv_weight, bn_weight, bn_bias, residual); the running statistics
    (updated in place), momentum, eps and relu are the second BN's."""
    conv: ConvNext
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float
    eps: float
    relu: bool
    recompute: bool = True

    def forward(self, y, tensors, bn):
        conv_weight, weight, bias, residual = tensors
        z = self.conv.conv(y, conv_weight, bn.backend)
        weight, bias = _affine(z, weight, bias, self.running_mean)
        out, mean, invstd, total = bn.forward(z, weight, bias, None if residual is None else dense(residual),
                                              self.running_mean, self.running_var, self.momentum, self.eps,
                                              self.relu)
        kept = None if self.recompute else z
        return out, (conv_weight, weight, out if self.relu else None, mean, invstd, total, kept)

    def backward(self, grad_out, y, saved, needs, need_y, bn):
        conv_weight, weight, out, mean, invstd, total, z = saved
        need_conv_weight, need_weight, need_bias, need_residual = needs
        if z is None:
            z = self.conv.conv(y, conv_weight, bn.backend)  # the conv output, recomputed
        need_z = need_y or need_conv_weight
        grad_y = grad_conv_weight = grad_weight = grad_bias = grad_residual = None
        if need_z or need_weight or need_bias or need_residual:
            # Without ReLU, out is not read (z stands in for it) and the residual's gradient is grad_out itself.
            grad_z, grad_weight, grad_bias, grad_residual = bn.backward(grad_out, out if self.relu else z, z, weight,
                                                                        mean, invstd, total, self.relu,
                                                                        need_residual and self.relu)
            if not self.relu and need_residual:
                grad_residual = grad_out
        if need_z:
            grad_y, grad_conv_weight = self.conv.conv_backward(grad_z, y, conv_weight, need_y, need_conv_weight)
        return grad_y, (grad_conv_weight, grad_weight, grad_bias, grad_residual)


class BNReLUThen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, then, group, backend,
                *next_tensors):
        name = resolve_backend("bn_act", backend, x.device, x.dtype)
        if group is None and name == "reference":
            raise ValueError("the recomputed BN + ReLU runs the fused backends' BN kernels; the reference backend "
                             "is plain PyTorch (batch_norm, relu, then the next op), which the blocks use as it is")
        bn = _BatchNorm(backend, name, group)
        x = dense(x)
        weight, bias = _affine(x, bn_weight, bn_bias, running_mean)
        y, mean, invstd, total = bn.forward(x, weight, bias, None, running_mean, running_var, momentum, eps,
                                            relu=True)
        out, saved = then.forward(y, next_tensors, bn)
        # Not the running statistics: later forwards update them in place, before this backward may run.
        ctx.save_for_backward(x, weight, bias, mean, invstd, total, *saved)
        ctx.then, ctx.bn = then, bn
        return out

    @staticmethod
    @differentiable_once("recomputed BN + ReLU")  # the statistics are saved as constants
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd, total, *saved = ctx.saved_tensors
        need_x, need_bn_weight, need_bn_bias = ctx.needs_input_grad[:3]  # False where the input was None
        need_bn = need_x or need_bn_weight or need_bn_bias
        y = _relu_output(x, weight, bias, mean, invstd, ctx.bn.name)  # the ReLU output, recomputed
        grad_y, next_grads = ctx.then.backward(grad_out, y, saved, ctx.needs_input_grad[10:], need_bn, ctx.bn)
        grad_x = grad_weight = grad_bias = None
        if need_bn:
            grad_x, grad_weight, grad_bias, _ = ctx.bn.backward(grad_y, y, x, weight, mean, invstd, total, True,
                                                                need_grad_pre=False)
        return (
            grad_x if need_x else None,
            grad_weight if need_bn_weight else None,
            grad_bias if need_bn_bias else None,
            None, None, None, None, None, None, None,
            *(g if need else None for g, need in zip(next_grads, ctx.needs_input_grad[10:])),
        )


def _runs_in_cpp(x, process_group, backend) -> bool:
    """Whether the op runs as its C++ op (csrc/recomputed_bn_relu.cpp, the same computation with a C++ autograd
    node instead of BNReLUThen's Python one): on the cpu backend in eager, without synchronized statistics. The
    other backends' convolutions and synchronized BN are Python (plain_conv, sync_bn.py), and under torch.compile
    the Python function is what the compiler traces."""
    return process_group is None and cpu_node_runs(x, backend, "bn_act", "conv_bn_act")


def bn_relu_then(x, bn_weight, bn_bias, running_mean, running_var, then, *next_tensors, momentum, eps,
                 process_group=None, backend=None):
    """then(relu(batch_norm(x, training=True))), `then` one of ConvNext, MaxPoolNext, ConvBNActNext with its
    differentiable tensors `next_tensors`: batch statistics, running statistics updated in place (momentum,
    unbiased variance). Keeps x, not the ReLU output. Differentiable in x, the BN parameters and next_tensors."""
    return BNReLUThen.apply(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, then, process_group,
                            backend, *next_tensors)


def bn_relu_conv(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, *, momentum, eps, stride, padding,
                 dilation, groups, process_group=None, backend=None):
    """conv2d(relu(batch_norm(x, training=True)), conv_weight), no bias or residual on the conv. Arguments as
    rf.bn_act and rf.conv_bn_act."""
    if _runs_in_cpp(x, process_group, backend):
        return torch.ops.resnet_fused.bn_relu_conv_training.default(
            x, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps), conv_weight, stride,
            padding, dilation, groups)
    return bn_relu_then(x, bn_weight, bn_bias, running_mean, running_var, ConvNext(stride, padding, dilation, groups),
                        conv_weight, momentum=momentum, eps=eps, process_group=process_group, backend=backend)


def bn_relu_max_pool(x, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps, kernel_size, stride,
                     padding, dilation=(1, 1), ceil_mode=False, process_group=None, backend=None):
    """max_pool2d(relu(batch_norm(x, training=True))), pool arguments as pairs of ints. Keeps x only: neither
    the ReLU output nor the pool's indices."""
    if _runs_in_cpp(x, process_group, backend):
        return torch.ops.resnet_fused.bn_relu_max_pool_training.default(
            x, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps), kernel_size, stride,
            padding, dilation, ceil_mode)
    return bn_relu_then(x, bn_weight, bn_bias, running_mean, running_var,
                        MaxPoolNext(kernel_size, stride, padding, dilation, ceil_mode), momentum=momentum, eps=eps,
                        process_group=process_group, backend=backend)


def bn_relu_conv_bn_act(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, bn2_weight, bn2_bias,
                        bn2_running_mean, bn2_running_var, residual=None, *, momentum, eps, momentum2, eps2, stride,
                        padding, dilation, groups, relu=True, recompute=True, process_group=None, backend=None):
    """act(batch_norm2(conv2d(relu(batch_norm(x)), conv_weight)) + residual), both BNs in training: a
    Bottleneck's BN2 + ReLU, conv3 and BN3 (+ shortcut, ReLU), a BasicBlock's BN1 + ReLU, conv2 and BN2. Keeps x
    and the output, and the conv output unless `recompute` (then the backward recomputes it, as it recomputes the
    ReLU output). Differentiable in x, both BNs' parameters, conv_weight and residual."""
    if _runs_in_cpp(x, process_group, backend):
        return torch.ops.resnet_fused.bn_relu_conv_bn_act_training.default(
            x, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps), conv_weight, stride,
            padding, dilation, groups, bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, residual,
            float(momentum2), float(eps2), relu, recompute)
    then = ConvBNActNext(ConvNext(stride, padding, dilation, groups), bn2_running_mean, bn2_running_var, momentum2,
                         eps2, relu, recompute)
    return bn_relu_then(x, bn_weight, bn_bias, running_mean, running_var, then, conv_weight, bn2_weight, bn2_bias,
                        residual, momentum=momentum, eps=eps, process_group=process_group, backend=backend)
