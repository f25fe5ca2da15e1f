#!/usr/bin/env bash
# Set up ddguide from a clone: a virtual environment, torch 2.13.0 and ddguide itself (editable, with the test extra
# and the diffusers extra, whose tests read diffusers model folders).
#
#   ./install.sh                       .venv (made here unless a virtual environment is active, then that one),
#                                      torch's CUDA build when `nvidia-smi` works, its CPU build otherwise
#   TORCH_VARIANT=cuda ./install.sh    force the CUDA build (PyPI's torch)
#   TORCH_VARIANT=cpu ./install.sh     force the CPU build
#
# The CPU build is asked for as torch==2.13.0+cpu from the configured package sources first (a local wheel folder
# or mirror that holds it is enough), and only when they lack it from PyTorch's CPU index,
# https://download.pytorch.org/whl/cpu: plain `pip install torch` would pull PyPI's multi-GB CUDA build.
# Exit codes: 0 installed; 1 pip failed; 2 bad usage (unknown TORCH_VARIANT, no python3 >= 3.10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
TORCH_VERSION=2.13.0
VARIANT=${TORCH_VARIANT:-auto}

case "$VARIANT" in
    auto | cpu | cuda) ;;
    *) echo "install.sh: TORCH_VARIANT must be cpu or cuda (or unset: cuda when nvidia-smi works), not '$VARIANT'" >&2
       exit 2 ;;
esac

# 1. the environment: the active one, or .venv here
if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
    echo "install.sh: installing into the active virtual environment $VIRTUAL_ENV" >&2
else
    if ! command -v python3 >/dev/null 2>&1 ||
            ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "install.sh: needs python3 >= 3.10 on PATH" >&2
        exit 2
    fi
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv || {
            echo "install.sh: python3 -m venv failed (on Debian/Ubuntu: apt install python3-venv)" >&2
            exit 1
        }
    fi
    PY="$PWD/.venv/bin/python"
    echo "install.sh: installing into $PWD/.venv" >&2
fi

# 2. torch
if [ "$VARIANT" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then VARIANT=cuda; else VARIANT=cpu; fi
fi
if [ "$VARIANT" = cuda ]; then
    "$PY" -m pip install "torch==$TORCH_VERSION"
elif ! "$PY" -m pip install "torch==$TORCH_VERSION+cpu"; then
    echo "install.sh: torch==$TORCH_VERSION+cpu is not in the configured package sources; trying PyTorch's CPU index" >&2
    "$PY" -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

# 3. ddguide, editable, with the test extra and diffusers (by name from the configured package sources)
"$PY" -m pip install -e ".[dev,diffusers]"

echo "install.sh: done ($VARIANT build of torch): $("$PY" -c 'import torch; print("torch", torch.__version__)'); run $(dirname "$PY")/ddguide" >&2
