#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and no package index, install this checkout,
# run the whole test suite with real Triton compilation on CUDA, then every benchmark, and
# write what was measured under benchmarks/results/ named by the device (copied to $OUT too).
#
# Wheels the machine lacks (pytest, ...) come from .whl/ (see scripts/fetch_gpu_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

device=$(python3 -c "import torch; from benchmarks.report import device_name; print(device_name(torch.device('cuda')))") || exit 1
results=benchmarks/results
mkdir -p "$results"
python3 - <<'PY' | tee "$results/$device-versions.txt"
import torch, triton, fastbml
from fastbml.backend import cpp_module
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| fastbml", fastbml.__version__, "| cpp kernels", cpp_module() is not None)
PY

python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$results/$device-tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m benchmarks.report --device cuda 2>&1 | tee "$results/$device-bench.log"
bench_rc=${PIPESTATUS[0]}
# the training step eager and compiled with mode="reduce-overhead" (CUDA graphs)
python3 -m benchmarks.bench_compile 2>&1 | tee "$results/$device-compile.log"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))

if [ -n "${OUT:-}" ]; then
  cp "$results/$device".* "$results/$device"-*.* "$OUT"/ 2>/dev/null || true
fi
echo "gpu_check: tests rc=$tests_rc, benchmarks rc=$bench_rc, results in $results/$device.*"
exit $(( tests_rc || bench_rc ))
