#!/usr/bin/env bash
# The two entry points of the README.
#   bash run.sh bench [benchmark args]   set up, build, benchmark against torch SDPA on the GPU
#                                        (no GPU: says so and runs the CPU reference demo)
#   bash run.sh test  [pytest args]      set up, build, run the test suite (GPU tests skip without a GPU)
# Set-up: a virtual environment in .venv (FLASH_ATTN_T_VENV=path to choose another, =none to use
# the current python3 as it is, e.g. on a machine without a package registry), the packages of
# requirements-dev.txt, then the extension built from source with
#   pip install --no-build-isolation --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
VENV="${FLASH_ATTN_T_VENV:-.venv}"

set_up() {
  if [ "$VENV" != none ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    python -m pip install -q -r requirements-dev.txt
  fi
  local start
  start=$(date +%s)
  python -m pip install -q --no-build-isolation --no-deps -e .
  echo "built flash_attn_t._C in $(( $(date +%s) - start )) s (MAX_JOBS=${MAX_JOBS:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a})"
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
    python -m pytest -q tests "$@"
    ;;
  *)
    echo "usage: bash run.sh bench|test [args]" >&2
    exit 2
    ;;
esac
