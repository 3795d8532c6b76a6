#!/usr/bin/env bash
# The GPU check, one short run: benchmarks/gpu_check.py, then the Triton tests on the device.
#   benchmarks/gpu_check.sh            on a CUDA machine; results in $OUT (or benchmarks/results)
#   benchmarks/gpu_check.sh --tiny     anywhere: CPU tensors through the Triton interpreter
# Optional wheels in .whl/ (inf-cl, open_clip_torch for its loss.py) are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 FITCLIP_ALLOW_NO_CPP=1
rc=0
# 1. The check (correctness on the device, then the benchmarks; its JSON is rewritten after every
#    case), 2. the Triton tests with the time left. About 9 minutes in all on an H100 (one call of
#    the device tool runs at most 10).
$PY benchmarks/gpu_check.py "$@" --out "$OUT_DIR" || rc=1
if [ "${1:-}" != "--tiny" ]; then
  # The float64-truth tests of the Triton path, now on CUDA with every dtype (bf16 included),
  # and the Triton custom ops (opcheck, torch.compile fullgraph with Inductor). Capped at
  # GPU_TEST_SECONDS (default 180) and at what is left of GPU_TOTAL_SECONDS (default 540, under
  # the device tool's 600 s a call).
  cap=${GPU_TEST_SECONDS:-180}
  left=$(( ${GPU_TOTAL_SECONDS:-540} - SECONDS ))
  [ $left -lt $cap ] && cap=$left
  if [ $cap -lt 30 ]; then
    echo "GPU tests skipped: ${SECONDS} s used of ${GPU_TOTAL_SECONDS:-540}" | tee "$OUT_DIR/gpu_tests.log"
    rc=1
  else
    timeout "$cap" $PY -m pytest tests/test_contrastive.py tests/test_distill.py \
      tests/test_custom_ops.py tests/test_frames.py -q -x -k triton -p no:cacheprovider --durations=15 \
      > "$OUT_DIR/gpu_tests.log" 2>&1
    trc=$?
    tail -n 40 "$OUT_DIR/gpu_tests.log"
    if [ $trc -eq 124 ]; then echo "GPU tests stopped after $cap s" | tee -a "$OUT_DIR/gpu_tests.log"; fi
    [ $trc -eq 0 ] || rc=1
  fi
fi
exit $rc
