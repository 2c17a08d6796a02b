"""Per-step training metrics: one JSON object per line in WORKDIR/metrics.jsonl, mirrored to TensorBoard when a
SummaryWriter is installed (tensorboardX or torch.utils.tensorboard; optional)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any


def _import_tensorboardx():
    """tensorboardX's SummaryWriter, imported without torch when torch is not loaded yet: its writer module
    imports torch (3-4 CPU-s, more than a tiny cached run's training) only for a type annotation, inside
    try/except ImportError; torch tensors are still converted (x2num imports torch when it meets one)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]  # torch stays importable for everything else
    return SummaryWriter


def _summary_writer(logdir: Path):
    # find_spec first: importing torch just to learn TensorBoard is missing would cost seconds per run.
    if importlib.util.find_spec("tensorboardX"):
        SummaryWriter = _import_tensorboardx()
    elif importlib.util.find_spec("tensorboard") and importlib.util.find_spec("torch"):
        from torch.utils.tensorboard import SummaryWriter
    else:
        return None
    return SummaryWriter(str(logdir))


class MetricsLog:
    def __init__(self, workdir: str | Path, resume_step: int = 0, tensorboard: bool = True, enabled: bool = True):
        """enabled=False (processes other than 0 of a multi-host run) writes nothing."""
        self.path = Path(workdir) / "metrics.jsonl"
        self.file = self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # Steps after the checkpoint we resume from are recomputed: drop their old lines.
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in lines))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.tb = _summary_writer(Path(workdir) / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
