"""Executes every notebook in notebooks/ top to bottom (NOTEBOOK_FAST=1 settings) in a fresh python3 kernel.

The committed files must have no outputs; they are executed in memory and the executed copy is written to the
test's temp directory (for inspection). Kernels inherit the session's persistent JAX compilation cache
(tests/conftest.py), so a step that several notebooks (and tests) compile is compiled once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "mla_kv_cache", "moe_routing", "finetune"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: commit with outputs cleared"
    assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{path.name}: no parameters cell"

    # The kernel inherits this environment: small settings, this checkout importable.
    monkeypatch.setenv("NOTEBOOK_FAST", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / path.name)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plot was produced"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
