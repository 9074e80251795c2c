"""Which backends exist here, which one an op call uses, and `use_backend`.

Backend choice is made in Python (the `backend=` argument, `use_backend`, or the default for the
tensors' device); device choice within the C++ ops is the dispatcher's.
"""
import os

import torch

from ._library import library_loaded, library_status

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Ops whose GPU kernels have passed their parity tests on a GPU, per backend. Only these are picked by
# default on CUDA tensors; everything else defaults to the reference path (cuDNN through PyTorch),
# which is always correct. An entry is added together with the committed bench/results record that
# shows the parity run; none exists yet.
GPU_VERIFIED: dict[str, frozenset[str]] = {"cuda": frozenset(), "triton": frozenset()}

# Read once, as Triton does when the kernels are defined.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA_AVAILABLE = torch.cuda.is_available()

# (op, backend) -> whether that backend has a kernel for the op; filled by refresh_kernel_table() once
# every op is registered, so a call only does dictionary lookups (cheap, and traceable by torch.compile).
_KERNELS: dict[tuple[str, str], bool] = {}

OPS = ("conv_bn_act", "bn_act", "add_act", "scale_add_act", "conv_stats", "max_pool2d")

# Dtypes a backend's kernel takes, where that is not every floating dtype.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # tl.dot has no float64
_DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {(op, "triton"): _TRITON_DTYPES for op in OPS}

# The stack of `use_backend` defaults; a plain list because torch.compile cannot trace ContextVar.get.
_DEFAULT_STACK: list[str] = []


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return _TRITON_INTERPRET


def _unavailable_reason(name: str) -> str | None:
    if name == "reference":
        return None
    if name == "cpu":
        return None if library_loaded("_C_cpu") else f"the C++ CPU library: {library_status('_C_cpu')}"
    if name == "cuda":
        if not library_loaded("_C_cuda"):
            return f"the CUDA library: {library_status('_C_cuda')}"
        return None if _CUDA_AVAILABLE else "no CUDA device is visible"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if not (_CUDA_AVAILABLE or _TRITON_INTERPRET):
            return "no CUDA device is visible (TRITON_INTERPRET=1 runs Triton kernels on CPU tensors)"
        if not any(_KERNELS.get((op, "triton")) for op in OPS):
            return "no Triton kernels are registered yet"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def refresh_kernel_table() -> None:
    """Records which backend implements which op. Called once the ops are registered."""
    for op in OPS:
        _KERNELS[(op, "reference")] = True
        for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            _KERNELS[(op, backend)] = library_loaded("_C") and torch._C._dispatch_has_kernel_for_dispatch_key(
                f"resnet_fused::{op}", key
            )
        _KERNELS[(op, "triton")] = hasattr(torch.ops.resnet_fused, f"{op}_triton")


def available_backends() -> list[str]:
    """The backends that can run on this machine: always "reference", then "cpu", "cuda", "triton"."""
    return [name for name in BACKENDS if _unavailable_reason(name) is None]


def has_kernel(op: str, backend: str) -> bool:
    return _KERNELS.get((op, backend), False)


def supports_dtype(op: str, backend: str, dtype: torch.dtype) -> bool:
    return dtype in _DTYPES.get((op, backend), (dtype,))


def _default_backend(op: str, device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        # Fastest first, and only kernels with a recorded GPU parity run.
        for name in ("cuda", "triton"):
            if (op in GPU_VERIFIED[name] and has_kernel(op, name) and supports_dtype(op, name, dtype)
                    and _unavailable_reason(name) is None):
                return name
        return "reference"
    if device.type == "cpu" and has_kernel(op, "cpu"):
        return "cpu"
    return "reference"


def resolve_backend(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs `op` on `dtype` tensors on `device`; raises if the requested one cannot."""
    if backend is None and _DEFAULT_STACK:
        backend = _DEFAULT_STACK[-1]
    if backend is None:
        return _default_backend(op, device, dtype)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    reason = _unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    if not has_kernel(op, backend):
        others = [name for name in available_backends() if has_kernel(op, name)]
        raise NotImplementedError(
            f"backend {backend!r} has no {op} kernel yet; backends with one here: {', '.join(others)}"
        )
    if not supports_dtype(op, backend, dtype):
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES[(op, backend)])
        raise TypeError(f"backend {backend!r} runs {op} on {names}, not {dtype}")
    if backend == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' runs on CPU tensors, but the inputs are on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' runs on CUDA tensors, but the inputs are on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _TRITON_INTERPRET):
        raise RuntimeError(
            f"backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"but the inputs are on {device}"
        )
    return backend


class use_backend:
    """Context manager: `with rf.use_backend("cpu"): ...` makes "cpu" the default backend inside.

    An explicit `backend=` argument still wins. The name is checked on entry.
    """

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
        reason = _unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
        self.name = name

    def __enter__(self):
        _DEFAULT_STACK.append(self.name)
        return self

    def __exit__(self, *exc):
        _DEFAULT_STACK.pop()
        return False
