#!/usr/bin/env bash
# The one prepared GPU run (a lent GPU; records go to bench/results/): build, the GPU tests, compute-sanitizer
# on the kernel tests, the benchmarks and one ncu profile, with logs and JSON under $OUT. The device tool
# allows 600 s per command and 15 minutes per session, so the whole script keeps to BUDGET seconds (default
# 540): steps run in priority order (correctness first), each with its own limit cut to what is left, and a
# failed step does not stop the next, so one problem does not hide the others.
#
# The libraries built here (same torch 2.11.0+cu130, an abi3 build that loads on the GPU machine's Python
# 3.12) can travel, which saves the minutes a build would take there: after `pip install
# --no-build-isolation -e .` here,
#   run(command="bash bench/gpu_check.sh", carry=["resnet_fused/_C.abi3.so", "resnet_fused/_C_cuda.abi3.so",
#       "resnet_fused/_C_cpu_default.abi3.so", "resnet_fused/_C_cpu_avx2.abi3.so",
#       "resnet_fused/_C_cpu_avx512.abi3.so", "resnet_fused/_build_config.json"], timeout_s=590)
# They are used only when _build_config.json's source digest matches the checkout's csrc/. Otherwise the
# script builds there, which needs the CUTLASS headers (no package registry there): here,
#   echo /.whl/ >> .git/info/exclude && pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0
# and add ".whl" to carry.
set -u
OUT=${OUT:-bench/out/gpu}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: COMMAND with a time limit (cut to the budget left), log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: budget spent" | tee -a "$OUT/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
}

# The CUTLASS headers from the carried wheel (a zip): setup.py reads RESNET_FUSED_CUTLASS_DIR.
if ls .whl/nvidia_cutlass-*.whl > /dev/null 2>&1; then
  python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/cutlass_wheel')" .whl/nvidia_cutlass-*.whl
  export RESNET_FUSED_CUTLASS_DIR=/tmp/cutlass_wheel/cutlass_library/source
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
  nvcc --version | tail -1
} > "$OUT/environment.txt" 2>&1

carried_libraries_match() {
  python - <<'EOF'
import json, pathlib, runpy, sys
config = json.loads(pathlib.Path("resnet_fused/_build_config.json").read_text())
digest = runpy.run_path("resnet_fused/_sources.py")["sources_digest"](pathlib.Path("."))
sys.exit(0 if config.get("cuda_compiled") and config.get("sources_sha256") == digest else 1)
EOF
}
if ls resnet_fused/_C_cuda*.so > /dev/null 2>&1 && carried_libraries_match 2> /dev/null; then
  echo "install skipped: the carried libraries match csrc/" | tee -a "$OUT/steps.txt"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  # Editable, so that `python -m bench` from the checkout sees the compiled libraries.
  step install 240 pip install --no-build-isolation --no-deps -e .
fi
step build_info 30 python -c "import json, resnet_fused as rf; print(json.dumps(rf.build_info(), indent=1)); print(rf.available_backends())"
# Correctness first: the kernel parity suites, then everything that runs on the device.
step tests_cuda_conv 120 pytest tests/test_cuda_conv.py -q -rs --junitxml="$OUT/tests_cuda_conv.xml"
step tests_gpu 150 pytest tests -q -rs -k "gpu or cuda" --ignore=tests/test_cuda_conv.py --junitxml="$OUT/tests_gpu.xml"
# compute-sanitizer slows kernels by 10-100x: representative subsets.
step memcheck_cuda_conv 45 compute-sanitizer --tool memcheck --error-exitcode 1 \
  pytest tests/test_cuda_conv.py -q -x -k representative
step racecheck_cuda_conv 45 compute-sanitizer --tool racecheck --error-exitcode 1 \
  pytest tests/test_cuda_conv.py -q -x -k representative
step memcheck_cuda_bn 40 compute-sanitizer --tool memcheck --error-exitcode 1 \
  pytest tests/test_cuda_bn_act.py -q -x -k "test_parity and float32"
step racecheck_cuda_bn 40 compute-sanitizer --tool racecheck --error-exitcode 1 \
  pytest tests/test_cuda_bn_act.py -q -x -k "test_parity and float32 and nhwc"
step memcheck_triton 45 compute-sanitizer --tool memcheck --error-exitcode 1 \
  pytest tests/test_triton_conv_kernel.py tests/test_triton_bn_kernel.py tests/test_add_act.py -q -x \
  -k "gpu_autotuned or gpu_depthwise or cuda"
# Speed: every ResNet-50 conv shape and the BN shapes at batch 256 against eager, cuDNN alone and
# torch.compile (default mode; max-autotune compiles for minutes per shape and does not fit here).
step bench_ops 150 python -m bench --ops conv bn memory --compile default --out "$OUT/bench"
# reference is the default on a GPU until a committed record verifies the kernels; cuda and triton (those that
# loaded) beside it.
gpu_backends=$(python -c "import resnet_fused as rf; print(*[b for b in ('cuda', 'triton') if b in rf.available_backends()])")
step bench_models 90 python -m bench --ops models --compile default --cuda-graphs --backends reference $gpu_backends \
  --out "$OUT/bench_models"
# What limits the CUDA conv where it does worst against cuDNN.
worst=$(python -m bench.worst_shape "$OUT/bench/results.json" 2>/dev/null)
if [ -n "$worst" ]; then
  step ncu_worst_conv 45 ncu --clock-control none --kernel-name regex:"conv_mma|cutlass" --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    python -m bench --ops conv --shapes "$worst" --backends cuda --compile --out "$OUT/ncu_bench"
fi
cat "$OUT/steps.txt"
