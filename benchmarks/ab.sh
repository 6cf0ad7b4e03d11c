#!/usr/bin/env bash
# Same-run A/B: builds the working tree with PATCH reversed ("base") and as it is ("new"),
# benchmarks both (flash_attn_t and cuDNN; the forward, PASS=bwd or PASS="fwd bwd" for the backward; AB_SM80=1 adds
# the forced sm80 kernels) and prints new / base per cell. Leaves "new" installed.
#   git diff HEAD~1 > ab.patch; bash benchmarks/ab.sh ab.patch [benchmark_attention.py args]
set -uo pipefail
cd "$(dirname "$0")/.."
patch_file=$(realpath "$1"); shift
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
backends="flash_attn_t sdpa_cudnn"; [ "${AB_SM80:-0}" = 1 ] && backends="$backends flash_attn_t_sm80"
out=$(mktemp -d)
base=$(mktemp -d)
cp -r . "$base/tree" && (cd "$base/tree" && patch -s -R -p1 < "$patch_file") || exit 1
for side in base new; do
  dir=$([ $side = base ] && echo "$base/tree" || pwd)
  (cd "$dir" && python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/build_$side.log" 2>&1) ||
    { tail -n 30 "$out/build_$side.log"; exit 1; }
  python3 "$dir/benchmarks/benchmark_attention.py" --passes ${PASS:-fwd} --backends $backends --variant $side \
    --out-dir "$out" "$@" > "$out/bench_$side.log" 2>&1 || { tail -n 30 "$out/bench_$side.log"; exit 1; }
done
python3 - "$out" <<'PY'
import csv, sys
rows = {}
for side in ("base", "new"):
    for r in csv.DictReader(open(f"{sys.argv[1]}/attention_{side}.csv")):
        key = (r["pass"], int(r["hdim"]), int(r["causal"]), int(r["seqlen"]))
        rows.setdefault(key, {})[side, r["backend"]] = float(r["tflops"])
sm80 = any(k[1] == "flash_attn_t_sm80" for v in rows.values() for k in v)
print(f"{'pass':>4} {'hdim':>4} {'causal':>6} {'seqlen':>6} {'base':>7} {'cudnn':>7} {'new':>7} {'cudnn':>7} {'new/base':>8}"
      + (f" {'sm80 base':>9} {'sm80 new':>8} {'new/base':>8}" if sm80 else ""))
for (pass_, hd, c, n), v in sorted(rows.items()):
    b, x = v["base", "flash_attn_t"], v["new", "flash_attn_t"]
    line = f"{pass_:>4} {hd:>4} {c:>6} {n:>6} {b:7.1f} {v['base', 'sdpa_cudnn']:7.1f} {x:7.1f} {v['new', 'sdpa_cudnn']:7.1f} {x / b:8.3f}"
    if sm80:
        b8, x8 = v["base", "flash_attn_t_sm80"], v["new", "flash_attn_t_sm80"]
        line += f" {b8:9.1f} {x8:8.1f} {x8 / b8:8.3f}"
    print(line)
PY
