#!/usr/bin/env bash
# The two entry points of the README.
#   bash run.sh bench [benchmark args]   set up, build, benchmark against torch SDPA on the GPU
#                                        (no GPU: says so and runs the CPU reference demo)
#   bash run.sh test  [pytest args]      set up, build, run the test suite (GPU tests skip without a GPU)
# Set-up: a virtual environment in .venv (FLASH_ATTN_T_VENV=path to choose another, =none to use
# the current python3 as it is, e.g. on a machine without a package registry), the packages of
# requirements-dev.txt, then the extension built from source with
#   pip install --no-build-isolation --no-deps -e .
# Reruns are cheap: the requirements are installed again only when requirements-dev.txt changed,
# and the extension is rebuilt only when a source file or a build knob changed -- then ninja
# (in build/ninja) recompiles just the files affected.
set -euo pipefail
cd "$(dirname "$0")"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
VENV="${FLASH_ATTN_T_VENV:-.venv}"

started=0
step() { echo "== $*"; started=$(date +%s); }
took() { echo "   ($(( $(date +%s) - started )) s)"; }

# True when flash_attn_t._C in this tree was built after every source file changed, for this
# environment's torch and with the build knobs set now, and the package is installed here. (The
# build record is written as a build starts: one newer than the extension belongs to a later build
# elsewhere, a wheel say, whose knobs it would show.)
extension_up_to_date() {
  local so
  so=$(ls flash_attn_t/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && [ -z "$(find csrc setup.py flash_attn_t/_build_config.py -type f -newer "$so" | head -n 1)" ] ||
    return 1
  python - <<'PY' 2>/dev/null
import importlib.metadata, os, sys
importlib.metadata.version("flash-attn-t")  # installed in this environment
from flash_attn_t import build_info, ops  # raises on a build for another torch
sys.exit(0 if ops.extension_available() and build_info.built_with(os.environ) else 1)
PY
}

set_up() {
  if [ "$VENV" != none ]; then
    if [ ! -x "$VENV/bin/python" ]; then
      step "creating the virtual environment $VENV"
      python3 -m venv "$VENV"
      took
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    local stamp="$VENV/.flash_attn_t_requirements"
    if ! cmp -s requirements-dev.txt "$stamp"; then
      step "installing requirements-dev.txt into $VENV (the first time: a CUDA build of PyTorch and its" \
           "NVIDIA libraries, about 6 GB installed; a few minutes)"
      python -m pip install -q -r requirements-dev.txt
      cp requirements-dev.txt "$stamp"
      took
    fi
  fi
  if extension_up_to_date; then
    echo "== flash_attn_t._C is up to date (no source file or build knob changed since it was built)"
    return
  fi
  local files
  files=$(wc -w < csrc/sources.txt)
  step "building flash_attn_t._C: $files source files, MAX_JOBS=${MAX_JOBS:-all cores}," \
       "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a} (from scratch 5-9 minutes on 2 cores;" \
       "afterwards only what changed)"
  python -m pip install -q --no-build-isolation --no-deps -e .
  took
}

command="${1:-}"
shift || true
case "$command" in
  bench)
    set_up
    if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      python benchmarks/benchmark_attention.py "$@"
    else
      echo "No CUDA GPU here: the kernels need one (sm80 or newer). Running the CPU reference demo instead."
      python -m flash_attn_t.demo
    fi
    ;;
  test)
    set_up
    step "running the tests (GPU tests skip without a GPU)"
    python -m pytest -q tests "$@"
    ;;
  *)
    echo "usage: bash run.sh bench|test [args]" >&2
    exit 2
    ;;
esac
