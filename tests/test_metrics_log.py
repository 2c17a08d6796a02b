"""metrics.jsonl and the TensorBoard mirror; a fresh training process does not pay for importing torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tensorboard_mirror_without_importing_torch(tmp_path):
    if importlib.util.find_spec("tensorboardX") is None:  # find_spec: importing it here would import torch
        pytest.skip("tensorboardX is not installed")
    script = f"""
import importlib.util, json, sys
# The module alone (stdlib imports only), not the dsv2_jax package: a fresh interpreter in about a second.
spec = importlib.util.spec_from_file_location("metrics_log", {str(ROOT / "dsv2_jax" / "train" / "metrics_log.py")!r})
metrics_log = importlib.util.module_from_spec(spec)
spec.loader.exec_module(metrics_log)
MetricsLog, read_metrics = metrics_log.MetricsLog, metrics_log.read_metrics
log = MetricsLog({str(tmp_path)!r})
assert log.tb is not None
log.write({{"step": 1, "loss": 2.5}})
log.close()
assert "torch" not in sys.modules, "tensorboardX pulled in torch (or its blocking None entry was left behind)"
print(json.dumps(read_metrics({str(tmp_path)!r})))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == [{"step": 1, "loss": 2.5}]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"loss" in events[0].read_bytes()
