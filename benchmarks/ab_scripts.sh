#!/usr/bin/env bash
# Same-run A/B of whole benchmark scripts (ab.sh tabulates benchmark_attention.py only): builds
# each side in a tree of its own and runs every command given, from the tree being measured, in
# the order base, the other side(s), base -- the second base run shows how far the machine
# drifted meanwhile. Each switch reinstalls the editable package (an editable install wins over
# PYTHONPATH, so this is how Python changes get compared too). Leaves the last side installed.
#   git diff main -- csrc flash_attn_t > ab.patch      (run: carry ["ab.patch"], it is ignored)
#   bash benchmarks/ab_scripts.sh ab.patch "python3 benchmarks/benchmark_features.py" \
#        "python3 benchmarks/benchmark_decode.py --rounds 3"
#       base: the working tree with ab.patch reversed; new: the working tree
#   bash benchmarks/ab_scripts.sh --apply "a.patch b.patch" "python3 benchmarks/benchmark_decode.py"
#       base: the working tree; then the working tree plus a.patch, plus b.patch (each alone)
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
copy() {  # copy LABEL DIRECTION PATCH: a copy of the working tree with PATCH applied (-R: reversed)
  local dir
  dir=$(mktemp -d)/"$1"
  cp -r . "$dir" && (cd "$dir" && patch -s $2 -p1 < "$3") || exit 1
  echo "$dir"
}
labels=() dirs=()
if [ "$1" = --apply ]; then
  labels+=(base) dirs+=("$(pwd)")
  for patch_file in $2; do
    labels+=("$(basename "$patch_file" .patch)") dirs+=("$(copy "$(basename "$patch_file" .patch)" -N "$(realpath "$patch_file")")")
  done
  shift 2
else
  labels+=(base new) dirs+=("$(copy base -R "$(realpath "$1")")" "$(pwd)")
  shift
fi
labels+=(base) dirs+=("${dirs[0]}")
log=$(mktemp)

install() {
  local start=$(date +%s)
  (cd "$1" && python3 -m pip install -q --no-build-isolation --no-deps -e . > "$log" 2>&1) ||
    { tail -n 30 "$log"; exit 1; }
  echo "(installed $1 in $(( $(date +%s) - start )) s)"
}

for k in "${!labels[@]}"; do
  install "${dirs[$k]}"
  echo "== ${labels[$k]}"
  for cmd in "$@"; do
    (cd "${dirs[$k]}" && eval "$cmd") 2>&1 | grep -v -i "warning"
  done
done
