#!/usr/bin/env bash
# GPU bring-up kit of the TensorRT plugin (docs/tensorrt.md, "GPU bring-up"): one run on a machine with an NVIDIA
# GPU, PyTorch with CUDA, Triton, nvcc and CMake (TensorRT optional), results in OUT. A few minutes: each step
# has its own time limit, and the limits add up to 8 minutes at most, so a hung kernel cannot hold the GPU.
#
#   benchmarks/gpu/run.sh OUT              # from the repository root
#   benchmarks/gpu/run.sh --dry-run OUT    # check arguments and tools, print the commands; no GPU needed (CI)
#   benchmarks/gpu/run.sh --pydeps DIR OUT # DIR: wheels (or a folder of packages) the machine's Python lacks, e.g.
#                                          # `pip download --no-deps -d DIR polygraphy` where a registry is reachable
#
# rq need not be installed there: the kit installs it editable without dependencies (pip install --no-deps -e .).
# The Python is $PYTHON, else .venv/bin/python, else python3.
#
# Steps; each logs to OUT/<step>.log, a failed step does not stop the later ones, OUT/summary.txt has one
# "PASSED | FAILED | SKIPPED <step>: <why>" line each, and the exit code is 1 when a step failed:
#   env     nvidia-smi and the versions of python, torch, triton, nvcc, cmake
#   plugin  cmake build of plugins/ for this GPU's compute capability (TensorRT headers: $TensorRT_INCLUDE_DIR,
#           else the system's /usr/include/x86_64-linux-gnu or /usr/local/tensorrt/include)
#   host    the launcher's host test
#   pytest  the @pytest.mark.gpu tests (tests/kernels, where they live; other folders need rq's full dependencies)
#   driver  the plugin's IPluginV3 runtime path on CUDA vs the PyTorch reference (benchmarks/gpu/plugin_driver.py):
#           INT4-only cases and cases mixing original, INT8 and INT4 copies (the INT8 class, docs/spec.md §5a)
#   bench   INT4 grouped GEMM vs FP16 torch at 1/16/128/512 tokens per expert, % of HBM bandwidth
#   trt     demo export -> rq build -> rq check --trt, where TensorRT or TensorRT-RTX runs on this GPU
#   trt-mixed  the same for a mixed INT4/INT8 plan of the demo (--precisions int4,int8, budget 0.875), from the
#           trt step's calibration
set -uo pipefail

usage() { echo "usage: $0 [--dry-run] [--pydeps DIR] OUT_DIR" >&2; exit 2; }
DRY=0
OUT=""
PYDEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --pydeps) [ $# -ge 2 ] || usage; PYDEPS="$2"; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
[ -z "$PYDEPS" ] || [ -d "$PYDEPS" ] || { echo "--pydeps $PYDEPS is not a folder" >&2; exit 2; }
[ -z "$PYDEPS" ] || PYDEPS="$(cd "$PYDEPS" && pwd)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
RQ=("$PY" -m rq.cli.main)

# Python packages: the --pydeps ones, then rq itself (editable) when it is not installed.
PYPATH=""
if [ -n "$PYDEPS" ]; then
  if ls "$PYDEPS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --target "$OUT/.pydeps" "$PYDEPS"/*.whl || exit 2
    PYPATH="$OUT/.pydeps"
  else
    PYPATH="$PYDEPS"
  fi
fi
[ -z "$PYPATH" ] || export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import rq.export, rq.engines" 2> /dev/null; then
  # rq itself, installed the way a developer installs it (editable, its dependencies left to the machine)
  [ "$DRY" = 1 ] && echo "would install rq: $PY -m pip install --no-deps --no-build-isolation -e $ROOT"
  if [ "$DRY" = 0 ] && ! "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" > "$OUT/install.log" 2>&1; then
    echo "cannot install rq from $ROOT (log: $OUT/install.log): pip install -e . there, or pass setuptools>=77 with --pydeps" >&2
    exit 2
  fi
fi
BUILD="$OUT/plugin-build"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

headers() {
  for dir in "${TensorRT_INCLUDE_DIR:-}" /usr/include/x86_64-linux-gnu /usr/local/tensorrt/include; do
    if [ -n "$dir" ] && [ -f "$dir/NvInferRuntime.h" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

# record STEP STATUS WHY
record() {
  echo "$2 $1: $3" | tee -a "$SUMMARY"
  [ "$2" != FAILED ] || FAILED=1
}

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
step() {
  local name="$1" limit="$2"
  shift 2
  if [ "$DRY" = 1 ]; then
    echo "would run [$name, <= ${limit}s]: $*"
    return 0
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [ $rc = 0 ]; then record "$name" PASSED "${took}s, log $name.log"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then record "$name" FAILED "over its ${limit}s limit, log $name.log"
  else record "$name" FAILED "exit $rc after ${took}s, log $name.log (last line: $(tail -n 1 "$OUT/$name.log"))"
  fi
  return $rc
}

# --- checks that need no GPU ---------------------------------------------------------------------------
for tool in cmake "$PY"; do
  command -v "$tool" > /dev/null || { echo "$tool not found" >&2; exit 2; }
done
HEADERS="$(headers || true)"
CC=""
if command -v nvidia-smi > /dev/null; then
  CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')"
fi
DEMO="$OUT/demo"
TRT_COMMANDS=(
  "calibrate rq/demo/checkpoint --data rq/demo/data/calibration.txt --sequences 8 --seq-len 128 --out '$DEMO/stats'"
  "plan '$DEMO/stats' --out '$DEMO/plan.json'"
  "export rq/demo/checkpoint --plan '$DEMO/plan.json' --out '$DEMO/build' --dtype float16 --force"
  "build '$DEMO/build/model.onnx' --plugin '$BUILD/librq_moe_plugin.so' --max-batch 4 --max-seq 256 --max-cache 256"
  "check '$DEMO/build' --trt"
)
TRT_MIXED_COMMANDS=(
  "plan '$DEMO/stats' --precisions int4,int8 --budget 0.875 --out '$DEMO/plan-mixed.json'"
  "export rq/demo/checkpoint --plan '$DEMO/plan-mixed.json' --out '$DEMO/build-mixed' --dtype float16 --force"
  "build '$DEMO/build-mixed/model.onnx' --plugin '$BUILD/librq_moe_plugin.so' --max-batch 4 --max-seq 256 --max-cache 256"
  "check '$DEMO/build-mixed' --trt"
)
if [ "$DRY" = 1 ]; then
  echo "dry run: python $PY, TensorRT headers ${HEADERS:-not found}, GPU compute capability ${CC:-none} (commands shown for ${CC:-90}), output $OUT"
  "$PY" -c "import rq, triton" || { echo "$PY lacks rq or triton" >&2; exit 2; }
  "$PY" -m benchmarks.gpu.plugin_driver --help > /dev/null || exit 2
  "$PY" -m benchmarks.bench_kernels --help > /dev/null || exit 2
  for c in "${TRT_COMMANDS[@]}" "${TRT_MIXED_COMMANDS[@]}"; do  # every option of the trt steps exists (click stops at --help after parsing them)
    eval "${RQ[*]} $c --help" > /dev/null || { echo "bad options in: rq $c" >&2; exit 2; }
  done
  CC="${CC:-90}"
fi

step env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available()); print(\"triton\", triton.__version__)'; nvcc --version; cmake --version"
if [ -z "$CC" ]; then
  record gpu FAILED "nvidia-smi reports no GPU: nothing below can run"
  [ "$DRY" = 1 ] || exit 1
fi

if [ -n "$HEADERS" ]; then
  step plugin 100 bash -c "cmake -S plugins -B '$BUILD' -DPython3_EXECUTABLE='$PY' -DTensorRT_INCLUDE_DIR='$HEADERS' \
      -DRQ_CUDA_ARCHS='$CC' -DRQ_WARNINGS_AS_ERRORS=ON && cmake --build '$BUILD' -j \$(nproc)"
  PLUGIN_OK=$?
else
  record plugin SKIPPED "no TensorRT headers (set TensorRT_INCLUDE_DIR): plugin and driver not built"
  PLUGIN_OK=1
fi
if [ "$PLUGIN_OK" = 0 ]; then
  step host 10 "$BUILD/rq_moe_host_test"
fi
step pytest 80 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels --junitxml="$OUT/pytest-gpu.xml"
if [ "$PLUGIN_OK" = 0 ] && ! "$PY" -c "import polygraphy" 2> /dev/null && [ "$DRY" = 0 ]; then
  record driver SKIPPED "$PY has no polygraphy (the comparison of rq.export.parity): pass --pydeps DIR with its wheel"
elif [ "$PLUGIN_OK" = 0 ]; then
  step driver 50 "$PY" -m benchmarks.gpu.plugin_driver --driver "$BUILD/rq_moe_plugin_driver" \
      --plugin "$BUILD/librq_moe_plugin.so" --out "$OUT/driver" --repeat 50
else
  record driver SKIPPED "no plugin build"
fi
step bench 60 "$PY" -m benchmarks.bench_kernels --no-whole-moe --tokens-per-expert 1 16 128 512 \
    --json "$OUT/bench_kernels.json"

# TensorRT end to end, only where a TensorRT that runs on this GPU is installed.
if [ "$DRY" = 1 ]; then
  TRT="dry run"
else
  TRT="$("$PY" -c "
from rq.engines.tensorrt import load_tensorrt, rtx_targets
rt = load_tensorrt()
print(rt if not rt.rtx or $CC in rtx_targets(rt) else '')" 2>/dev/null || true)"
fi
if [ -n "$TRT" ] && [ "$PLUGIN_OK" = 0 ] || [ "$DRY" = 1 ]; then
  script="set -e"
  for c in "${TRT_COMMANDS[@]}"; do script+=$'\n'"${RQ[*]} $c"; done
  step trt 90 bash -c "$script"
  script="set -e"
  for c in "${TRT_MIXED_COMMANDS[@]}"; do script+=$'\n'"${RQ[*]} $c"; done
  step trt-mixed 60 bash -c "$script"
else
  record trt SKIPPED "no TensorRT or TensorRT-RTX that runs on sm_$CC here (TensorRT-RTX has no SM90/SM100 target)"
  record trt-mixed SKIPPED "as trt"
fi

echo "summary: $SUMMARY"
exit $FAILED
