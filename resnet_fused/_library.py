"""Soft loading of the compiled libraries, and build_info().

The C++ libraries register their ops with the dispatcher when loaded. A library that is missing, or was
built for another torch, is skipped with the reason recorded: `import resnet_fused` still works, and
only the backends that need it are unavailable.
"""
import importlib.util
import json
from pathlib import Path

import torch

_CONFIG_PATH = Path(__file__).with_name("_build_config.json")

# library module name -> "loaded" or the reason it is not
_STATUS: dict[str, str] = {}


def _read_build_config() -> dict:
    try:
        return json.loads(_CONFIG_PATH.read_text())
    except (OSError, ValueError):
        return {}


_BUILD_CONFIG = _read_build_config()


def _load(name: str) -> None:
    built_with = _BUILD_CONFIG.get("torch_version")
    if built_with is None:
        _STATUS[name] = "not built: install with `pip install --no-build-isolation .`"
        return
    if built_with != torch.__version__:
        # Loading a library built against another torch ABI can crash the process: refuse instead.
        _STATUS[name] = (
            f"built for torch {built_with} (CUDA {_BUILD_CONFIG.get('torch_cuda_version')}), but torch "
            f"{torch.__version__} is installed: rebuild with `pip install --no-build-isolation .`"
        )
        return
    spec = importlib.util.find_spec(f"resnet_fused.{name}")
    if spec is None or spec.origin is None:
        _STATUS[name] = "not built: install with `pip install --no-build-isolation .`"
        return
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:
        _STATUS[name] = f"failed to load {spec.origin}: {error}"
        return
    _STATUS[name] = "loaded"


def cpu_isa() -> str:
    """The instruction set whose CPU kernel library suits this machine: torch's own choice for its CPU
    kernels (torch.backends.cpu.get_cpu_capability(), which the ATEN_CPU_CAPABILITY variable overrides),
    among the libraries that were built."""
    wanted = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    built = _BUILD_CONFIG.get("cpu_isas", ["default"])
    for isa in ("avx512", "avx2", "default")[("avx512", "avx2", "default").index(wanted):]:
        if isa in built:
            return isa
    return "default"


# The CPU kernels: one library per instruction set (setup.py), loaded under the name "_C_cpu".
_CPU_LIBRARY = f"_C_cpu_{cpu_isa()}"

_load("_C")
for _name, _compiled, _skip in (("_C_cpu", True, None),
                                ("_C_cuda", _BUILD_CONFIG.get("cuda_compiled"), _BUILD_CONFIG.get("cuda_skip_reason"))):
    if not _compiled:
        _STATUS[_name] = f"not built: {_skip or 'no build record'}"
    elif _STATUS["_C"] != "loaded":
        _STATUS[_name] = "not loaded: the op schemas in _C are unavailable"
    elif _name == "_C_cpu":
        _load(_CPU_LIBRARY)
        _STATUS["_C_cpu"] = _STATUS.pop(_CPU_LIBRARY)
    else:
        _load(_name)


def library_loaded(name: str) -> bool:
    """Whether the compiled library `_C` (the op schemas), `_C_cpu` (the CPU kernels, for this machine's
    instruction set) or `_C_cuda` is loaded."""
    return _STATUS.get(name) == "loaded"


def library_status(name: str) -> str:
    return _STATUS.get(name, "unknown library")


def build_info() -> dict:
    """What was compiled, against which torch and CUDA, and why any library did not load."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .backends import triton_interpret

    return {
        "cpu_compiled": library_loaded("_C_cpu"),
        "cpu_isa": cpu_isa() if library_loaded("_C_cpu") else None,  # the CPU kernels' instruction set
        "cuda_compiled": library_loaded("_C_cuda"),
        "cuda_archs": _BUILD_CONFIG.get("cuda_archs", []),
        # the CUTLASS Hopper conv kernels (csrc/cuda/conv/sm90/), part of _C_cuda when compiled
        "cutlass_sm90_compiled": bool(_BUILD_CONFIG.get("cutlass_sm90_compiled")) and library_loaded("_C_cuda"),
        "built_with_torch": _BUILD_CONFIG.get("torch_version"),
        "built_with_cuda": _BUILD_CONFIG.get("torch_cuda_version"),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_version": triton_version,
        "triton_interpret": triton_interpret(),
        "load_errors": {name: status for name, status in _STATUS.items() if status != "loaded"},
    }
