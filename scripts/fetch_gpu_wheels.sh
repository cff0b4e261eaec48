#!/usr/bin/env bash
# Downloads (here, with network) the pure-Python wheels the GPU check needs that the lent GPU
# machine lacks (it has torch, triton, numpy, pybind11, scikit-learn but no package index),
# into .whl/ (git-ignored), to be carried along: device run with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  "pytest==9.0.3" "pluggy>=1.5" "iniconfig>=2" "packaging>=24" "pytest-benchmark==5.2.3" \
  "py-cpuinfo==9.0.0" "setuptools>=75" "wheel" "faiss-cpu==1.15.1" \
  "simplejpeg==1.9.0" "soxr==1.1.0"
ls -la .whl
