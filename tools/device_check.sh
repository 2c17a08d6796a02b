#!/usr/bin/env bash
# Device check on one H100/H200 (or a TPU host), < 8 min in all: the compiled-kernel tests, then every benchmark,
# each time-boxed (rows a benchmark wrote before its box closed are kept), then ONE results file,
# $OUT/results.md, a section to paste into docs/benchmarks.md (raw rows stay in $OUT/*.jsonl, logs in $OUT/*.txt).
#   OUT=/tmp/out bash tools/device_check.sh
#   SMOKE=1 OUT=/tmp/smoke bash tools/device_check.sh   # CPU: tiny shapes, interpreted kernels (checks the script)
#
#   step            box   what
#   device tests    120s  tests/test_kernels_device.py: decode kernel, flash fwd+bwd (tokamax on GPU) vs references
#   decode kernel    75s  tools/bench_kernels.py: latent-cache GB/s of the kernel vs the XLA reference
#   flash prefill    60s  tools/bench_kernels.py: fwd and fwd+bwd TFLOP/s vs the XLA reference
#   grouped GEMM     45s  tools/bench_moe.py (if present): expert GEMM TFLOP/s per backend
#   train MFU        90s  tools/bench_train.py: 4-layer V2-Lite slice, bf16, seq 2048, one device
#   serving          45s  tools/bench_serve.py (if present): continuous-batching throughput
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
SMOKE="${SMOKE:-0}"
# Boxes are sized for the accelerator; a CPU smoke run compiles slower (BOX_SCALE multiplies every box).
BOX_SCALE="${BOX_SCALE:-$([ "$SMOKE" = 1 ] && echo 4 || echo 1)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave room for the XLA reference paths
# tests/conftest.py defaults JAX_PLATFORMS to cpu (CI simulates 8 CPU devices): name the accelerator here.
if [ "$SMOKE" = 1 ]; then export JAX_PLATFORMS=cpu
elif command -v nvidia-smi >/dev/null 2>&1; then export JAX_PLATFORMS=cuda
else export JAX_PLATFORMS=tpu; fi
rm -f "$OUT"/*.jsonl "$OUT/steps.tsv"

status=0
# step NAME SECONDS CMD...: run time-boxed, log to $OUT/NAME.txt, record (name, rc, seconds) for the report.
step() {
  local name=$1 box=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$((box * BOX_SCALE))" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$OUT/steps.tsv"
  echo "$name: exit $rc after $(($(date +%s) - t0)) s (log $OUT/$name.txt)"
  [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import jax; print(jax.__version__, jax.devices())" >"$OUT/env.txt" 2>&1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
fi
uptime >>"$OUT/env.txt"

if [ "$SMOKE" = 1 ]; then
  KERNEL_ARGS=(--small)
  TRAIN_ARGS=(--config configs/train-tiny.json --steps 2 --set seq_len=64 --set global_batch=2)
  MOE_ARGS=(--quick)
  SERVE_ARGS=(--preset tiny --requests 8 --rate 16)
else
  KERNEL_ARGS=(--quick --iters 10)
  TRAIN_ARGS=(--config deepseek-v2-lite --steps 5 --set model.num_hidden_layers=4 --set seq_len=2048
              --set global_batch=8 --set remat=dots --set compute_dtype=bfloat16)
  MOE_ARGS=(--quick --tokens 4096 --topk 6 --hidden 2048 --width 1408)  # V2-Lite expert shapes
  SERVE_ARGS=(--preset tiny --requests 32)  # random V2-Lite weights take minutes to draw on the host
fi

step device_tests 120 "$PY" -m pytest tests/test_kernels_device.py -q -rA -p no:cacheprovider \
  --junitxml="$OUT/device_tests.xml"
# Decode first (the headline number).
step bench_decode 75 "$PY" tools/bench_kernels.py --which decode "${KERNEL_ARGS[@]}" --out "$OUT/kernels.jsonl"
step bench_prefill 60 "$PY" tools/bench_kernels.py --which prefill "${KERNEL_ARGS[@]}" --out "$OUT/kernels.jsonl"
if [ -f tools/bench_moe.py ]; then
  step bench_moe 45 "$PY" tools/bench_moe.py "${MOE_ARGS[@]}" --out "$OUT/moe.jsonl"
fi
step bench_train 90 "$PY" tools/bench_train.py "${TRAIN_ARGS[@]}"
if [ -f tools/bench_serve.py ]; then
  step bench_serve 45 "$PY" tools/bench_serve.py "${SERVE_ARGS[@]}" --json "$OUT/serve.jsonl"
fi

# One results file: environment, step outcomes, and a table per benchmark from its rows.
"$PY" - "$OUT" <<'EOF' >"$OUT/results.md"
import json, pathlib, re, subprocess, sys

out = pathlib.Path(sys.argv[1])
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
env = (out / "env.txt").read_text().strip().splitlines()
print(f"## Device check {rev}\n\n```\n" + "\n".join(env) + "\n```\n")
print("| step | exit | seconds |\n|---|---|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    print(f"| {name} | {'ok' if rc == '0' else 'timeout' if rc == '124' else rc} | {secs} |")


def rows(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def table(title, items, keys=None):
    if not items:
        return
    keys = keys or [k for k in items[0] if k not in ("device", "backend")]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    print(f"\n### {title}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in items:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")


kern = rows(out / "kernels.jsonl")
table("Decode kernel: latent-cache GB/s vs XLA", [r for r in kern if r.get("kernel") == "decode"],
      ["B", "H", "T", "ms", "GBps", "xla_GBps", "speedup", "error"])
table("Flash prefill / training attention: TFLOP/s vs XLA", [r for r in kern if r.get("kernel") != "decode"],
      ["B", "H", "T", "fwd_TFLOPs", "xla_fwd_TFLOPs", "fwdbwd_TFLOPs", "xla_fwdbwd_TFLOPs", "speedup_fwdbwd",
       "error"])
table("Grouped GEMM (tools/bench_moe.py)", rows(out / "moe.jsonl"))
train = re.search(r"\{.*\}", (out / "bench_train.txt").read_text(), re.S) if (out / "bench_train.txt").exists() else None
table("Train step (tools/bench_train.py)", [json.loads(train.group(0))] if train else [],
      ["device", "mesh", "global_batch", "seq_len", "step_s", "tokens_per_s", "model_tflops_per_s", "mfu"])
table("Serving (tools/bench_serve.py)", rows(out / "serve.jsonl"))
tests = out / "device_tests.txt"
if tests.exists():
    print("\n### Device tests\n\n```\n" + "\n".join(tests.read_text().strip().splitlines()[-15:]) + "\n```")
EOF
echo "device_check exit status: $status (results: $OUT/results.md)" | tee "$OUT/status.txt"
exit "$status"
