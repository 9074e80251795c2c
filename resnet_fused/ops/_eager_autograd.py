"""Eager calls of the ops without torch.library's Python autograd wrapper.

The wrapper that `torch.library.register_autograd` installs costs about 30 us per forward call here and a few
more per backward, and runs even when no gradient is needed (bn_act on 1x8x4x4: forward 40 us through it, 12 us
through an autograd.Function with the same formulas; with no gradient 9 us through it, 5 us below the autograd
keys; forward + backward 70 us against 36, where eager BN + ReLU takes 31 us). At batch 1 and in a training step's
small layers that is more than the kernels take. So the Python entry points call the ops through `eager_caller`:
the op below the autograd keys, inside an autograd.Function built from the formulas registered for the op
when a gradient is needed. Under torch.compile and torch.export, and for anyone calling torch.ops.resnet_fused.*
directly, the registered formulas apply; both paths share setup_context and backward, so they cannot disagree.
The ops modules register their formulas through `register_autograd` here and call their ops as `eager(op)(...)`.
(rf.bn_act on the C++ backends goes further: bn_act_autograd, whose autograd node is C++; see bn_act.py.)"""
from collections.abc import Callable

import torch

from ..backends import resolve_backend
from ._no_double_backward import differentiable_once as _differentiable_once

# A context in which op calls skip the autograd dispatch keys (and so the torch.library wrappers), for callers
# that differentiate the ops themselves; also used by recomputed_bn_relu.py.
below_autograd = torch._C._AutoDispatchBelowAutograd


def cpu_node_runs(x: torch.Tensor, backend: str | None, *ops: str) -> bool:
    """Whether a call on x may take an op whose autograd node is C++ (bn_act_autograd, conv_training, the recomputing
    ops) and skip the Python around it: in eager (torch.compile and torch.export trace the Python functions and the
    formulas registered for the ops; a torch.func transform takes no C++ node) and with each of `ops` resolving to
    the cpu backend."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch._C._are_functorch_transforms_active():
        return False
    for op in ops:
        if resolve_backend(op, backend, x.device, x.dtype) != "cpu":
            return False
    return True


# Per op overload (torch.ops.namespace.name.default): its eager caller.
_CALLERS = {}


def op_of(qualname: str):
    """torch.ops.<namespace>.<name>.default of "namespace::name": the overload itself, since calling the packet
    (torch.ops.<namespace>.<name>) picks the overload again on every call (about 4 us here)."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def register_autograd(qualname: str, backward: Callable, setup_context: Callable, **options) -> None:
    """torch.library.register_autograd(qualname, backward, setup_context=setup_context), and the op's eager
    caller with the same formulas (`eager`); options as eager_caller's."""
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    op = op_of(qualname)
    _CALLERS[op] = eager_caller(op, setup_context, backward, **options)


def eager(op):
    """The eager caller of an op overload (torch.ops.<namespace>.<name>.default) whose formulas were registered
    with register_autograd (see eager_caller)."""
    return _CALLERS[op]


def eager_caller(op, setup_context: Callable, backward: Callable, *, differentiable_outputs: int = 1,
                 differentiable_once: str | None = None):
    """call(*args) -> op(*args) (positional arguments only), differentiable through setup_context(ctx, inputs,
    output) and backward(ctx, *grads) as registered for op. Of a tuple of outputs, those after the first
    `differentiable_outputs` carry no gradient (statistics, running averages). differentiable_once="<op>": the
    backward calls gradient kernels (run below the autograd keys too) and a second derivative through it raises,
    as the registered one does (see _no_double_backward); otherwise it is PyTorch ops, differentiable again."""
    def run_backward(ctx, *grads):
        with below_autograd():
            return backward(ctx, *grads)

    eager_backward = _differentiable_once(differentiable_once)(run_backward) if differentiable_once else backward

    class Call(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply binds the arguments
        # through inspect.signature on every call (about 8 us here).
        @staticmethod
        def forward(ctx, *args):
            with below_autograd():
                output = op(*args)
            setup_context(ctx, args, output)
            if isinstance(output, tuple) and len(output) > differentiable_outputs:
                ctx.mark_non_differentiable(*output[differentiable_outputs:])
                if differentiable_outputs == 1:
                    # Only the first output carries a gradient, so the backward always gets one for it; no zeros
                    # need be made for the others (the backward ignores them).
                    ctx.set_materialize_grads(False)
            return output

        backward = staticmethod(eager_backward)

    def call(*args):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Call.apply(*args)
        with below_autograd():
            return op(*args)

    return call
