#!/usr/bin/env bash
# Nsight Compute profile of one sm90 kernel launch (the third, after two warm-ups) with SASS-level
# stall samples: the forward kernel, or with PASS=bwd the main backward kernel of a forward +
# backward. Writes $OUT/ncu_<tag>_details.txt (pipe utilisation, warp states) and
# $OUT/ncu_<tag>_source.csv (per-instruction samples). Needs the extension installed.
#   [PASS=fwd|bwd] bash benchmarks/profile.sh HEAD_DIM SEQLEN CAUSAL(0|1) [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
pass=${PASS:-fwd} hd=$1 seqlen=$2 causal=$3 tag=${4:-${PASS:-fwd}_hd${1}_${2}_c${3}}
OUT="${OUT:-profile_out}"
mkdir -p "$OUT"
script=$(mktemp --suffix .py)
cat > "$script" <<PY
import torch
from flash_attn_t import flash_attn_func
heads = 2048 // $hd
q, k, v = [torch.randn(16384 // $seqlen, $seqlen, heads, $hd, device="cuda", dtype=torch.bfloat16,
                       requires_grad="$pass" == "bwd") for _ in range(3)]
for _ in range(3):
    out = flash_attn_func(q, k, v, causal=bool($causal))
    if "$pass" == "bwd":
        out.sum().backward()
torch.cuda.synchronize()
PY
rep=$(mktemp -u)
ncu --kernel-name-base demangled --kernel-name "regex:sm90::${pass}_kernel" --launch-skip 2 --launch-count 1 \
  --set full --import-source yes -o "$rep" python3 "$script" > "$OUT/ncu_${tag}.log" 2>&1
ncu -i "$rep.ncu-rep" --page details > "$OUT/ncu_${tag}_details.txt"
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${tag}_source.csv"
