"""Backward formulas written with PyTorch ops but meant to be differentiated once only.

A backward that saved batch statistics as constants would, differentiated again (create_graph=True), drop
the terms that go through those statistics and give a wrong second derivative without a word.
torch.autograd.function.once_differentiable does not prevent it when the second derivative is taken with
respect to tensors the backward reached only through saved tensors (the engine prunes its error node).
Instead, the backward runs without recording, and its results are tied to the tensors it depends on through
a node that raises when a second derivative needs it, as the C++ ops' registered double backward does."""
import functools

import torch


class _RaiseWhenDifferentiated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, what, count, *tensors):
        ctx.what = what
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"{ctx.what}: double backward (a gradient of the gradient) is not supported")


def differentiable_once(what: str):
    """Decorator of an autograd.Function's backward(ctx, *grads): runs it without recording, and when autograd
    records the backward (create_graph=True), makes a second derivative through it raise. Its results depend
    on the incoming gradients and ctx.saved_tensors."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # a backward without create_graph: nothing records it
                return backward(ctx, *grads)
            with torch.no_grad():
                results = backward(ctx, *grads)
            anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            present = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
            if not anchors or not present:
                return results
            tied = _RaiseWhenDifferentiated.apply(what, len(present), *[results[i] for i in present], *anchors)
            results = list(results)
            for i, t in zip(present, tied):
                results[i] = t
            return tuple(results)
        return wrapper
    return decorate
