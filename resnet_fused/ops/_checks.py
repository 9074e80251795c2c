"""Argument checks shared by the ops. They run once, before any backend, so every backend fails the
same way: TypeError for wrong types and dtypes, ValueError for wrong shapes and values, RuntimeError
for device mixes."""
from collections.abc import Callable

import torch


def check_tensor(t, name: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        layout = {4: " (N, C, H, W)", 1: " (C,)"}.get(ndim, "")
        raise ValueError(f"{name} must be {ndim}-D{layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_same_dtype(reference: torch.Tensor, reference_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}")


def check_same_device(reference: torch.Tensor, reference_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise RuntimeError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_shape(t: torch.Tensor | None, name: str, shape) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, as conv2d takes them, as a checked pair."""
    values = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if values is None or len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def call_signature(tensors: tuple, *options) -> tuple | None:
    """What an op's argument checks read of a call, as a key for CheckCache: each of `tensors`' shape, dtype and
    device (None for None), then `options` (the other arguments the checks look at), each with its type. None,
    so never cached, when one of `tensors` is neither a tensor nor None: the checks then say what it is."""
    described = []
    for t in tensors:
        if t is None:
            described.append(None)
        elif isinstance(t, torch.Tensor):
            described.append((t.shape, t.dtype, t.device))
        else:
            return None
    return (*described, *map(_typed, options))


def _typed(option):
    """An option with its type, and a tuple's or list's elements with theirs: 1, 1.0, True and numpy's 1 are
    equal keys, but a check may take one and refuse another. One level deep, as the ops' options go (a pair of
    ints is the deepest a check accepts)."""
    kind = type(option)
    if kind is tuple or kind is list:
        return (kind, *[(type(element), element) for element in option])
    return (kind, option)


class CheckCache:
    """An op's argument checks, run once per call signature (see call_signature): a call whose signature passed
    before gets the checks' result again without running them. The checks are Python and cost microseconds per
    call, as much as a small layer's kernels (bench/overhead.py measures it); a model calls each op with the same
    few signatures over and over. The checks must depend on nothing but the signature and return no tensor.
    Bypassed under torch.compile and torch.export, which run the checks once when they trace. Holds at most
    `limit` signatures and is emptied when full, so inputs whose shapes never repeat cannot grow it."""

    def __init__(self, check: Callable, limit: int = 256):
        self._check = check
        self._results: dict = {}
        self._limit = limit

    def __call__(self, signature: tuple | None, *args):
        """check(*args), or its result for an earlier call with the same signature."""
        if signature is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self._check(*args)
        try:
            return self._results[signature]
        except KeyError:
            pass
        except TypeError:  # an unhashable option: the checks say what is wrong with it, or pass it every time
            return self._check(*args)
        result = self._check(*args)
        if len(self._results) >= self._limit:
            self._results.clear()
        self._results[signature] = result
        return result
