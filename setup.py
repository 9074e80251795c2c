"""Builds resnet_fused: the CPU C++ extension always, the CUDA extension when torch has CUDA and a
toolkit is found. Build against the installed torch: ``pip install --no-build-isolation .``.

Environment knobs:
  RESNET_FUSED_CPU_ONLY=1         skip the CUDA extension even when a toolkit is present
  RESNET_FUSED_CUDA_ARCHS=80;90a  GPU architectures to compile for (default: sm_80 and sm_90a)
  RESNET_FUSED_CUTLASS_DIR=DIR    CUTLASS source tree (DIR/include, DIR/tools/util/include) for the Hopper
                                  conv kernels; default: the headers of the installed nvidia-cutlass wheel
                                  (requirements.txt)
  MAX_JOBS=N                      parallel compile jobs (read by torch's ninja build)
"""
import importlib.util
import json
import os
import platform
from pathlib import Path

# torch.utils.cpp_extension fixes CUDA_HOME when it is imported. Where nvcc on the PATH is a wrapper
# script (not a symlink into the toolkit), torch infers /usr/local and the link fails with
# "cannot find -lcudart"; the standard toolkit location is the better guess.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent.resolve()


def _sources_digest() -> str:
    spec = importlib.util.spec_from_file_location("_sources", ROOT / "resnet_fused" / "_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources_digest(ROOT)
DEFAULT_CUDA_ARCHS = "80;90a"


def cuda_skip_reason():
    if os.environ.get("RESNET_FUSED_CPU_ONLY") == "1":
        return "RESNET_FUSED_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    return None


def cutlass_root():
    """The CUTLASS tree holding include/ and tools/util/include/, or None."""
    candidates = [os.environ.get("RESNET_FUSED_CUTLASS_DIR")]
    # The nvidia-cutlass wheel ships the headers under cutlass_library/source/; find it without importing it.
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "source")
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cutlass" / "cutlass.h").exists():
            return Path(candidate).resolve()
    return None


def sm90_skip_reason(cuda_archs, cutlass):
    if "90a" not in cuda_archs:
        return "sm_90a is not among RESNET_FUSED_CUDA_ARCHS"
    if cutlass is None:
        return "CUTLASS headers not found (pip install nvidia-cutlass, or set RESNET_FUSED_CUTLASS_DIR)"
    return None


def gencode_flags(archs):
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    # PTX of the oldest architecture too, so a newer GPU without a matching cubin (sm_100, sm_120) can JIT it.
    oldest = min(archs, key=lambda a: int(a.rstrip("a")))
    flags.append(f"-gencode=arch=compute_{oldest},code=compute_{oldest}")
    return flags


def sources(pattern):
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


# The CPU kernels are written once with at::vec::Vectorized and compiled once per instruction set, each into
# its own library, as PyTorch compiles its own CPU kernels; at import, resnet_fused loads the one that matches
# torch.backends.cpu.get_cpu_capability() (which ATEN_CPU_CAPABILITY overrides). Separate libraries, not
# separate objects in one library: an inline function compiled with AVX-512 in one object could otherwise be
# the copy the linker keeps for every caller.
CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def cpu_isas():
    """The instruction sets to build CPU kernels for: the x86 vector extensions only on x86-64."""
    return list(CPU_ISA_FLAGS) if platform.machine().lower() in ("x86_64", "amd64") else ["default"]


def cpu_kernel_extension(isa):
    defines = [f"-DCPU_CAPABILITY={isa.upper()}"] + ([f"-DCPU_CAPABILITY_{isa.upper()}"] if isa != "default" else [])
    return CppExtension(
        f"resnet_fused._C_cpu_{isa}",
        sources("csrc/cpu/*.cpp"),
        # at::parallel_for needs OpenMP to run in parallel
        extra_compile_args={"cxx": ["-O3", "-fopenmp", *defines, *CPU_ISA_FLAGS[isa]]},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


def extensions(cuda_archs, skip_reason, cutlass, sm90_skip):
    # _C holds every op schema, and the C++ autograd nodes of the eager training paths (backend-independent:
    # they call the other ops through the dispatcher); the CPU and CUDA libraries register kernels for the ops.
    exts = [CppExtension("resnet_fused._C", ["csrc/ops.cpp", "csrc/bn_act_autograd.cpp", "csrc/conv_training.cpp",
                                             "csrc/recomputed_bn_relu.cpp"],
                         extra_compile_args={"cxx": ["-O3"]}, py_limited_api=True)]
    exts += [cpu_kernel_extension(isa) for isa in cpu_isas()]
    if skip_reason is None:
        cuda_sources = [*sources("csrc/cuda/**/*.cpp"), *sources("csrc/cuda/**/*.cu")]
        defines, include_dirs = [], []
        if sm90_skip is None:
            defines.append("-DRESNET_FUSED_SM90")
            include_dirs += [str(cutlass / "include"), str(cutlass / "tools" / "util" / "include")]
        else:  # the CUTLASS translation units need the headers and sm_90a
            cuda_sources = [s for s in cuda_sources if "/sm90/" not in s]
        exts.append(
            CUDAExtension(
                "resnet_fused._C_cuda",
                cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": ["-O3", *defines],
                    # -DNDEBUG: without it ptxas serializes wgmma (ENV.md, warning C7510).
                    "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", *defines, *gencode_flags(cuda_archs)],
                },
                py_limited_api=True,
            )
        )
    return exts


def write_build_config(cuda_archs, skip_reason, sm90_skip):
    """Records what the libraries were built against; resnet_fused._library checks it before loading."""
    config = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cpu_isas": cpu_isas(),
        "cuda_compiled": skip_reason is None,
        "cuda_skip_reason": skip_reason,
        "cuda_archs": cuda_archs if skip_reason is None else [],
        "cutlass_sm90_compiled": skip_reason is None and sm90_skip is None,
        "cutlass_sm90_skip_reason": skip_reason or sm90_skip,
        "sources_sha256": _sources_digest(),  # what bench/gpu_check.sh checks carried libraries against
    }
    (ROOT / "resnet_fused" / "_build_config.json").write_text(json.dumps(config, indent=2) + "\n")


class BuildPerLibrary(BuildExtension):
    """torch's BuildExtension (ninja), with each library's objects in a folder of its own: the CPU kernel
    libraries compile the same sources with different flags, and shared object paths would make every
    build recompile them all."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, use_ninja=True, **kwargs)

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


skip_reason = cuda_skip_reason()
cuda_archs = [a for a in os.environ.get("RESNET_FUSED_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a]
cutlass = cutlass_root()
sm90_skip = sm90_skip_reason(cuda_archs, cutlass)
if skip_reason:
    print(f"resnet_fused: skipping the CUDA extension: {skip_reason}")
else:
    print(f"resnet_fused: building the CUDA extension with {CUDA_HOME} for sm_{', sm_'.join(cuda_archs)}")
    print(f"resnet_fused: CUTLASS Hopper conv: {'from ' + str(cutlass) if sm90_skip is None else 'skipped, ' + sm90_skip}")
write_build_config(cuda_archs, skip_reason, sm90_skip)

setup(
    name="resnet_fused",
    version="0.1.0",
    description="Fused conv + BN + residual + ReLU kernels (CUDA C++, Triton, CPU) for ResNets",
    packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
    package_data={"resnet_fused": ["_build_config.json"]},
    python_requires=">=3.10",
    ext_modules=extensions(cuda_archs, skip_reason, cutlass, sm90_skip),
    cmdclass={"build_ext": BuildPerLibrary},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
