#!/usr/bin/env bash
# The GPU check: one call of the device tool (at most 600 s), finished by construction.
#   benchmarks/gpu_check.sh              on a CUDA machine; results in $OUT (or benchmarks/results)
#   benchmarks/gpu_check.sh --tiny       anywhere: CPU tensors through the Triton interpreter
# One budget for the whole script, GPU_TOTAL_SECONDS (default 540): gpu_check.py gets it less the
# GPU_TEST_SECONDS (default 75) kept for the Triton tests after it, and starts each section only if
# its estimate fits (docs/TESTING.md); the tests get what is left. Peers' wheels in .whl/
# (`make wheels`: open_clip for its loss.py, inf-cl, memeff, siglip-kernel) go to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL=${GPU_TOTAL_SECONDS:-540}
TESTS=${GPU_TEST_SECONDS:-75}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
TINY=0
for a in "$@"; do [ "$a" = "--tiny" ] && TINY=1; done
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "WARNING: the peers' wheels in .whl/ did not install; the check records each peer as not run"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 FITCLIP_ALLOW_NO_CPP=1
export FITCLIP_COMMIT=${FITCLIP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
rc=0
# 1. the check: correctness, peers, benchmarks, large sizes (its JSON rewritten after every case;
#    its own alarm stops it at its budget, `timeout` is the backstop)
budget=$(( TOTAL - TESTS - SECONDS ))
timeout --kill-after=10 $(( budget + 20 )) $PY benchmarks/gpu_check.py "$@" --budget-seconds "$budget" --out "$OUT_DIR" || rc=1
# 2. the Triton tests on the device with what is left: the custom ops first (opcheck, torch.compile
#    with Inductor, the no-host-sync traces, TF32, float16 gradients), then every op against
#    float64 in every dtype. Under --tiny only the custom ops' quick checks (the interpreter runs
#    the rest in `make test`).
: > "$OUT_DIR/gpu_tests.log"
run_tests() {  # run_tests N PYTEST_ARGS...: pytest with the time left, log and junit XML in $OUT_DIR
  local n=$1 left
  shift
  left=$(( TOTAL - SECONDS - 5 ))
  if [ $left -lt 20 ]; then
    echo "GPU tests $n ($*) not run: ${SECONDS} s of ${TOTAL} used" | tee -a "$OUT_DIR/gpu_tests.log"
    rc=1
    return
  fi
  echo "== GPU tests $n: pytest $* (at most $left s)" >> "$OUT_DIR/gpu_tests.log"
  timeout "$left" $PY -m pytest "$@" -q -p no:cacheprovider --durations=10 --junitxml="$OUT_DIR/gpu_tests_$n.xml" \
    >> "$OUT_DIR/gpu_tests.log" 2>&1
  local trc=$?
  if [ $trc -eq 124 ]; then echo "GPU tests $n stopped after $left s (the budget's rest)" | tee -a "$OUT_DIR/gpu_tests.log"; fi
  [ $trc -eq 0 ] || rc=1
}
if [ $TINY = 1 ]; then
  run_tests 1 tests/test_triton_ops.py -k "no_host_sync or tf32"
else
  run_tests 1 tests/test_triton_ops.py
  run_tests 2 tests/test_contrastive.py tests/test_sigmoid.py tests/test_frames.py tests/test_distill.py -k triton
fi
tail -n 30 "$OUT_DIR/gpu_tests.log"
echo "gpu_check.sh: ${SECONDS} s of ${TOTAL}, exit $rc"
exit $rc
