#!/usr/bin/env bash
# The context-parallel check on a machine with two or more GPUs: build (all cores), the
# distributed tests (NCCL across the GPUs, gloo on the CPU), the training example and the ring
# attention benchmark on 1 and W GPUs. Everything it writes goes to $OUT (or ./gpu_check_out).
#   bash benchmarks/gpu_check_multi.sh [benchmark_context_parallel.py args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
world=$(nvidia-smi -L | wc -l)
status=0

echo "== build"
nvidia-smi --query-gpu=index,name,clocks.max.sm --format=csv,noheader
nvidia-smi topo -m | head -n $((world + 1))
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s with MAX_JOBS=$MAX_JOBS"

echo "== distributed tests"
python3 -m pytest -q tests/test_distributed.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== training example on 1 and $world GPUs"
python3 benchmarks/train_context_parallel.py --world "$world" 2>&1 | tee "$OUT/train.log" | tail -n 8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== ring attention benchmark on 1 and $world GPUs"
python3 benchmarks/benchmark_context_parallel.py --world "$world" "$@" 2>&1 | tee "$OUT/benchmark.log" | tail -n 20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
