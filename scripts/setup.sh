#!/usr/bin/env bash
# Create .venv (once) and install bilevel with the given extras (default: test).
# Where no NVIDIA GPU is present, torch is installed first as a CPU build so that
# the `torch` requirement does not pull a CUDA build of several GB. Set
# TORCH_SPEC to choose another torch (e.g. "torch==2.13.0+cpu" together with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu on a machine whose
# pip has no CPU wheel at hand).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install "${TORCH_SPEC:-torch}"
  else
    pip install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
pip install -e ".[${extras}]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "bilevel installed in .venv with extras [${extras}]: $(.venv/bin/python -c 'import torch, bilevel; print("bilevel", bilevel.__version__, "torch", torch.__version__)')"
