"""The build and the soft loading of the compiled libraries."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_binary import cuobjdump

import resnet_fused as rf
from resnet_fused import _library

# CI sets this: there the CUDA extension must have been compiled, never silently skipped.
REQUIRE_CUDA_BUILD = os.environ.get("RESNET_FUSED_REQUIRE_CUDA_BUILD") == "1"


def test_build_info_fields():
    info = rf.build_info()
    for key in ("cpu_compiled", "cuda_compiled", "torch_version", "torch_cuda_version", "load_errors",
                "built_with_torch", "cuda_archs", "cutlass_sm90_compiled", "triton_version", "gpu"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["load_errors"], dict)
    assert rf.available_backends()[0] == "reference"
    assert set(rf.available_backends()) <= {"reference", "cpu", "cuda", "triton"}
    assert ("cpu" in rf.available_backends()) == info["cpu_compiled"]


@pytest.mark.skipif(not REQUIRE_CUDA_BUILD, reason="RESNET_FUSED_REQUIRE_CUDA_BUILD is not set")
def test_cuda_extension_was_built_and_loads():
    info = rf.build_info()
    assert info["cuda_compiled"], info["load_errors"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::add_act", "CUDA")


def test_cuda_library_holds_sm80_and_sm90a_code():
    if not rf.build_info()["cuda_compiled"]:
        assert not REQUIRE_CUDA_BUILD
        pytest.skip(f"CUDA extension not built: {rf.build_info()['load_errors'].get('_C_cuda')}")
    listing = cuobjdump("-lelf")
    archs = set(rf.build_info()["cuda_archs"])
    assert {"80", "90a"} <= archs
    assert "sm_80.cubin" in listing and "sm_90.cubin" in listing, listing
    sass = cuobjdump("-sass", "-arch", "sm_90a")
    assert "add_act_kernel" in sass
    assert "LDG.E.128" in sass, "the vectorized add_act kernel should use 16-byte loads"


def test_library_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_library, "_BUILD_CONFIG", {"torch_version": "1.0.0", "torch_cuda_version": "9.9"})
    monkeypatch.setattr(_library, "_STATUS", {})
    _library._load("_C")
    status = _library.library_status("_C")
    assert "built for torch 1.0.0 (CUDA 9.9)" in status and torch.__version__ in status
    assert not _library.library_loaded("_C")


def test_missing_library_is_reported(monkeypatch):
    monkeypatch.setattr(_library, "_STATUS", {})
    _library._load("_C_does_not_exist")
    assert _library.library_status("_C_does_not_exist").startswith("not built")


def test_import_without_compiled_libraries(tmp_path):
    """A checkout that was never built still imports, with only the reference backend."""
    package = Path(rf.__file__).parent
    copy = tmp_path / "resnet_fused"
    # copytree follows symlinks (symlinks=False): an editable checkout's resnet_fused/triton_kernels is a link to
    # ../triton_kernels, a regular install holds real files; the copy gets the kernels either way.
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("*.so", "_build_config.json", "__pycache__"))
    code = (
        "import resnet_fused as rf, resnet_fused.triton_kernels as tk, torch;"
        "print(rf.__file__); print(tk.__file__);"
        "print(rf.available_backends());"
        "print(rf.build_info()['load_errors']['_C']);"
        "x = torch.randn(1, 2, 3, 3); w = torch.randn(2, 2, 1, 1);"
        "print(rf.conv_bn_act(x, w).shape)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The copy itself was imported, kernels included, not the checkout or install these tests run from.
    assert Path(lines[0]).is_relative_to(copy) and Path(lines[1]).is_relative_to(copy), lines[:2]
    assert lines[2] == "['reference']"
    assert lines[3].startswith("not built")
    assert lines[4] == "torch.Size([1, 2, 3, 3])"
