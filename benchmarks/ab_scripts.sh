#!/usr/bin/env bash
# Same-run A/B of whole benchmark scripts (ab.sh tabulates benchmark_attention.py only): builds
# the working tree with PATCH reversed ("base", in a copy) and as it is ("new"), then runs every
# command given, from the tree being measured, in the order base, new, base -- the second base run
# shows how far the machine drifted meanwhile. Each switch reinstalls the editable package (an
# editable install wins over PYTHONPATH, so this is how Python changes get compared too). Leaves
# "new" installed.
#   git diff main -- csrc flash_attn_t > ab.patch      (run: carry ["ab.patch"], it is ignored)
#   bash benchmarks/ab_scripts.sh ab.patch "python3 benchmarks/benchmark_features.py" \
#        "python3 benchmarks/benchmark_decode.py --rounds 3"
set -uo pipefail
cd "$(dirname "$0")/.."
patch_file=$(realpath "$1"); shift
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
new=$(pwd)
base=$(mktemp -d)/tree
cp -r . "$base" && (cd "$base" && patch -s -R -p1 < "$patch_file") || exit 1
log=$(mktemp)

install() {
  local start=$(date +%s)
  (cd "$1" && python3 -m pip install -q --no-build-isolation --no-deps -e . > "$log" 2>&1) ||
    { tail -n 30 "$log"; exit 1; }
  echo "(installed $1 in $(( $(date +%s) - start )) s)"
}

for side in base new base; do
  dir=$([ "$side" = base ] && echo "$base" || echo "$new")
  install "$dir"
  echo "== $side"
  for cmd in "$@"; do
    (cd "$dir" && eval "$cmd") 2>&1 | grep -v -i "warning"
  done
done
install "$new"
