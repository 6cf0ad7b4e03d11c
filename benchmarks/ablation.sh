#!/usr/bin/env bash
# Ablation of the sm90 kernels' switches (setup.py's FLASH_ATTN_T_* build knobs): builds the
# extension (sm_90a only) with the default switches, then once per override below, benchmarks
# each build (the forward; PASS=bwd for the backward), and prints one TFLOP/s table with a column
# per build.
#   bash benchmarks/ablation.sh [benchmark_attention.py args, e.g. --seqlens 2048 8192]
#   VARIANTS="PINGPONG=0 LAZY_RESCALE=0" bash benchmarks/ablation.sh ...   (other overrides;
#   a comma joins overrides of one build: SM90_HD64_WARPGROUPS=3,PINGPONG=0)
#   FEATURES=1 ... also runs benchmark_features.py on each build (window, softcap, ALiBi, sinks,
#   dropout against the plain kernel; FEATURES_ARGS="--variants window" for a subset) and prints
#   its tables after the TFLOP/s table.
# Writes the logs and CSVs under $OUT (or ./ablation_out). Leaves the last build installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-ablation_out}"
mkdir -p "$OUT"
rm -f "$OUT"/features_*.log
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a

for variant in defaults ${VARIANTS:-SM90_TENSOR_ROW_SUM=1 LAZY_RESCALE=0 PINGPONG=0}; do
  knob=(); [ "$variant" = defaults ] || for k in ${variant//,/ }; do knob+=("FLASH_ATTN_T_$k"); done
  label=$(echo "$variant" | tr 'A-Z=,' 'a-z__')
  start=$(date +%s)
  env "${knob[@]}" python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build_$label.log" 2>&1 ||
    { tail -n 30 "$OUT/build_$label.log"; exit 1; }
  echo "== $label (build $(( $(date +%s) - start )) s)"
  python3 benchmarks/benchmark_attention.py --passes "${PASS:-fwd}" --backends flash_attn_t --variant "$label" \
    --out-dir "$OUT" "$@" > "$OUT/bench_$label.log" 2>&1 || { tail -n 30 "$OUT/bench_$label.log"; exit 1; }
  if [ "${FEATURES:-0}" = 1 ]; then
    python3 benchmarks/benchmark_features.py ${FEATURES_ARGS:-} > "$OUT/features_$label.log" 2>&1 || { tail -n 30 "$OUT/features_$label.log"; exit 1; }
  fi
done

python3 - "$OUT" <<'PY'
import csv, sys
from pathlib import Path
rows = [r for f in sorted(Path(sys.argv[1]).glob("attention_*.csv")) for r in csv.DictReader(open(f))]
variants = list(dict.fromkeys(r["variant"] for r in rows))
table = {(int(r["hdim"]), int(r["causal"]), int(r["seqlen"]), r["variant"]): float(r["tflops"]) for r in rows}
print(f"{'hdim':>4} {'causal':>6} {'seqlen':>6} " + " ".join(f"{v:>22}" for v in variants))
for cell in sorted({k[:3] for k in table}):
    print(f"{cell[0]:>4} {cell[1]:>6} {cell[2]:>6} " + " ".join(f"{table.get((*cell, v), 0):22.1f}" for v in variants))
PY
if [ "${FEATURES:-0}" = 1 ]; then
  for log in "$OUT"/features_*.log; do
    echo "== $(basename "$log" .log)"
    grep -v -i warning "$log"
  done
fi
