#!/usr/bin/env bash
# Sets up .venv with fastbml (C++ kernels built), its dependencies and the test tools.
# A machine without an NVIDIA GPU gets the CPU build of torch, never the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch==2.13.0"
  else
    # The +cpu build: found on this machine's wheel cache, or on PyTorch's CPU index
    # (add `--extra-index-url https://download.pytorch.org/whl/cpu` via PIP_EXTRA_INDEX_URL).
    "${pip[@]}" "torch==2.13.0+cpu" || {
      echo "setup: no CPU build of torch found; set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
      exit 1
    }
  fi
fi

"${pip[@]}" "setuptools>=68" "pybind11>=2.12" wheel
"${pip[@]}" --no-build-isolation -e ".[test]"
.venv/bin/python -c "import fastbml, fastbml.backend as b; print('fastbml', fastbml.__version__, '| cpp kernels:', b.cpp_module() is not None, '| triton:', b.triton_available())"
# In CI a C++ build that failed must fail the run (locally it only disables the cpp backend,
# and its tests would be skipped).
if [ "${CI:-}" = "true" ]; then
  .venv/bin/python -c "import fastbml._C" || { echo "setup: fastbml._C did not build" >&2; exit 1; }
fi
