#!/usr/bin/env bash
# Device check for the MLA Pallas kernels on one H200 (or a TPU host): compiled
# kernel tests, then the benchmark. Total budget < 8 min; outputs under $OUT.
#   OUT=/tmp/out bash tools/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave room for the XLA reference paths
# tests/conftest.py defaults JAX_PLATFORMS to cpu (CI simulates 8 CPU devices): name the accelerator here.
if command -v nvidia-smi >/dev/null 2>&1; then export JAX_PLATFORMS=cuda; else export JAX_PLATFORMS=tpu; fi

status=0
"$PY" -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"
nvidia-smi >> "$OUT/env.txt" 2>&1 || true

# 1) Compiled kernels vs references (~1-2 min incl. compilation).
timeout 180 "$PY" -m pytest tests/test_kernels_device.py -q -rA -p no:cacheprovider \
  --junitxml="$OUT/device_tests.xml" 2>&1 | tee "$OUT/device_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2) Benchmarks, decode first (the headline number); each step is time-boxed so
# the whole script stays under 8 minutes even if a shape stalls.
rm -f "$OUT/bench.jsonl"
timeout 150 "$PY" tools/bench_kernels.py --which decode --iters 10 --out "$OUT/bench.jsonl" \
  2>&1 | tee "$OUT/bench_decode.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 "$PY" tools/bench_kernels.py --which prefill --iters 5 --out "$OUT/bench.jsonl" \
  2>&1 | tee "$OUT/bench_prefill.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "device_check exit status: $status" | tee "$OUT/status.txt"
exit "$status"
