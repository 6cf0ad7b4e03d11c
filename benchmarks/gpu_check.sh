#!/usr/bin/env bash
# One full check on a GPU machine: build (all cores), the test suite, compute-sanitizer on a
# small forward + backward, then the benchmark, the variants' benchmark and the decode benchmarks
# (GPU and host time).
# Everything it writes goes to $OUT (or ./gpu_check_out).
#   bash benchmarks/gpu_check.sh [benchmark_attention.py options, e.g. --quick]
#   PARTS="tests sanitizer" bash benchmarks/gpu_check.sh     (a subset; the build always runs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PARTS="${PARTS:-tests sanitizer bench features decode}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
status=0
part() { [[ " $PARTS " == *" $1 "* ]]; }

echo "== build"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s with MAX_JOBS=$MAX_JOBS"

if part tests; then
  echo "== tests"
  python3 -m pytest -q --maxfail=10 tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if part sanitizer; then
  echo "== compute-sanitizer (memcheck, racecheck) on a small forward + backward"
  # Each tool runs in well under a minute; a hang (racecheck has hung on a kernel change) ends
  # at the timeout (exit 124) instead of taking the rest of the device call.
  for tool in memcheck racecheck; do
    timeout "${SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python3 benchmarks/sanitizer_case.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    echo "$tool: exit $rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -n 1)"
    [ $rc -eq 0 ] || status=1
  done
fi

if part bench; then
  echo "== benchmark"
  python3 benchmarks/benchmark_attention.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/benchmark.log" | tail -n 60
fi
if part features; then
  echo "== variants benchmark"
  python3 benchmarks/benchmark_features.py 2>&1 | tee "$OUT/features.log" | tail -n 40
fi
if part decode; then
  echo "== decode benchmark"
  python3 benchmarks/benchmark_decode.py --rounds 3 2>&1 | tee "$OUT/decode.log" | tail -n 20
  python3 benchmarks/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log"
fi
exit $status
