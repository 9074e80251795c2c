"""Argument checks shared by the ops. They run once, before any backend, so every backend fails the
same way: TypeError for wrong types and dtypes, ValueError for wrong shapes and values, RuntimeError
for device mixes."""
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
