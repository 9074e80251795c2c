"""Eager calls of the ops without torch.library's Python autograd wrapper.

The wrapper that `torch.library.register_autograd` installs costs about 30 us per forward and 30 us per backward
here (bn_act on 1x8x4x4, forward + backward: 70 us through it, 36 us through an autograd.Function with the same
formulas; eager BN + ReLU: 31 us), and runs even when no gradient is needed. At batch 1 and in a training step's
small layers that is more than the kernels take. So the Python entry points call the ops through `eager_caller`:
the op below the autograd keys, inside an autograd.Function built from the formulas registered for the op
when a gradient is needed. Under torch.compile and torch.export, and for anyone calling torch.ops.resnet_fused.*
directly, the registered formulas apply; both paths share setup_context and backward, so they cannot disagree."""
from collections.abc import Callable

import torch

from ._no_double_backward import differentiable_once

_below_autograd = torch._C._AutoDispatchBelowAutograd


def eager_caller(op, setup_context: Callable, backward: Callable, differentiable_outputs: int, what: str):
    """call(*args) -> op(*args) (positional arguments only), differentiable through setup_context(ctx, inputs,
    output) and backward(ctx, *grads) as registered for op; op's outputs after the first `differentiable_outputs`
    carry no gradient (statistics, running averages). The backward's ops run below the autograd keys too, and a
    second derivative through it raises (see _no_double_backward), as the registered one does."""
    class Call(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply binds the arguments
        # through inspect.signature on every call (about 10 us).
        @staticmethod
        def forward(ctx, *args):
            with _below_autograd():
                output = op(*args)
            setup_context(ctx, args, output)
            ctx.mark_non_differentiable(*output[differentiable_outputs:])
            return output

        @staticmethod
        @differentiable_once(what)
        def backward(ctx, *grads):
            with _below_autograd():
                return backward(ctx, *grads)

    def call(*args):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Call.apply(*args)
        with _below_autograd():
            return op(*args)

    return call
