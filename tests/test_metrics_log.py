"""metrics.jsonl and the TensorBoard mirror; a fresh training process does not pay for importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tensorboard_mirror_without_importing_torch(tmp_path):
    pytest.importorskip("tensorboardX")
    script = f"""
import sys
from dsv2_jax.train.metrics_log import MetricsLog, read_metrics
log = MetricsLog({str(tmp_path)!r})
assert log.tb is not None
log.write({{"step": 1, "loss": 2.5}})
log.close()
assert "torch" not in sys.modules, "tensorboardX pulled in torch (or its blocking None entry was left behind)"
print(read_metrics({str(tmp_path)!r}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().replace("'", '"')) == [{"step": 1, "loss": 2.5}]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"loss" in events[0].read_bytes()
