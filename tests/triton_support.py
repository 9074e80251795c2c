"""What the Triton kernel test files share: where the kernels run (a GPU, or the interpreter on CPU tensors)
and the ahead-of-time compile of their configs in a subprocess."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]

gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def require_runnable(kernels_module) -> None:
    """Skips the calling test module when its kernels can run neither on a GPU nor in the interpreter."""
    if not HAS_CUDA and not kernels_module.INTERPRET:
        pytest.skip("no CUDA device, and TRITON_INTERPRET=1 was not set before the kernels were imported "
                    "(tests/conftest.py sets it)", allow_module_level=True)


def aot_compile(out_dir: Path, *args: str, timeout: int) -> list[dict]:
    """Rows of `python -m resnet_fused.triton_kernels.aot *args --json`, run in a subprocess without
    TRITON_INTERPRET (under the interpreter @triton.jit kernels cannot be compiled)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = out_dir / "aot.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.triton_kernels.aot", *args, "--json", str(out)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout.splitlines()[-1], f"(test wall {elapsed:.0f} s)")
    return json.loads(out.read_text())
