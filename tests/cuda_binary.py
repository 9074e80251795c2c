"""What the built CUDA library holds, read with cuobjdump (Triton ships one): SASS per kernel and resource
usage. CPU-runnable: these tests prove the kernels compiled to what we meant without a GPU."""
import importlib.util
import re
import subprocess
from pathlib import Path


def cuobjdump(*args: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    library = importlib.util.find_spec("resnet_fused._C_cuda").origin
    return subprocess.run([tool, *args, library], capture_output=True, text=True, check=True).stdout


def sass_functions(arch: str) -> dict[str, str]:
    """Mangled kernel name -> its SASS, for one architecture."""
    sass = cuobjdump("-sass", "-arch", arch)
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def resource_usage() -> dict[tuple[str, str], dict[str, int]]:
    """(arch, mangled kernel name) -> {"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..}."""
    usage, arch, function = {}, None, None
    for line in cuobjdump("-res-usage").splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and (fields := dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))):
            usage[(arch, function)] = {k: int(v) for k, v in fields.items()}
            function = None
    return usage
