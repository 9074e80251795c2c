#!/usr/bin/env bash
# The one prepared GPU run (the `device` tool; see DEVELOPERS.md): build, the GPU tests, compute-sanitizer
# memcheck on the kernel tests, and the benchmarks, with logs and JSON under $OUT. Sized for ~8 minutes
# on an H200 so that one rerun fits in the session's 15 minutes of device time. Each step has its own
# time limit and the script goes on after a failed step, so one problem does not hide the others.
#   run: bash bench/gpu_check.sh        (OUT defaults to bench/out/gpu)
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1

# Editable, so that `python -m bench` from the checkout sees the compiled libraries.
step install 300 pip install --no-build-isolation --no-deps -e .
step build_info 60 python -c "import json, resnet_fused as rf; print(json.dumps(rf.build_info(), indent=1)); print(rf.available_backends())"
step tests 240 pytest tests -q -x -rs --junitxml="$OUT/tests.xml"
# memcheck slows kernels by 10-100x: a representative subset of the kernel tests.
step memcheck 180 compute-sanitizer --tool memcheck --error-exitcode 1 \
  pytest tests/test_triton_conv_kernel.py tests/test_triton_bn_kernel.py tests/test_add_act.py -q -x \
  -k "gpu_autotuned or gpu_depthwise or cuda"
step memcheck_cuda_bn 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
  pytest tests/test_cuda_bn_act.py -q -x -k "test_parity and float32"
step racecheck_cuda_bn 120 compute-sanitizer --tool racecheck --error-exitcode 1 \
  pytest tests/test_cuda_bn_act.py -q -x -k "test_parity and float32 and nhwc"
step bench_conv 240 python -m bench --out "$OUT/bench"
cat "$OUT/steps.txt"
