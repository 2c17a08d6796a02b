"""No command loses user data; every fault ends in one clear line (issue 11, one test group per item)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dsv2_jax import convert as convert_mod
from dsv2_jax.cli import main
from dsv2_jax.config import ConfigError, ModelConfig
from dsv2_jax.safe_output import OUTPUT_MARKER, WRITER_RECORD
from dsv2_jax.safetensors_io import CheckpointError, SafetensorsCheckpoint, write_safetensors
from dsv2_jax.train import TrainingDiverged, train
from dsv2_jax.train_config import TrainConfig
from tests.train_fixtures import make_test_config, synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of an in-process `dsv2` call; its stdout is left in `cli.out`."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    cli.out = captured.out
    return rc, captured.err.strip().splitlines()


def one_error(lines: list[str], command: str, *needles: str) -> None:
    errors = [ln for ln in lines if "error" in ln or "interrupted" in ln]
    assert len(errors) == 1 and errors[0].startswith(f"dsv2 {command}: "), lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- 1. --force replaces only what this tool wrote ---------------------------------------------------------

def test_force_never_deletes_the_input_or_foreign_directories(hf_v2, tmp_path, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(hf_v2[0], proj / "hf")
    (proj / "notes.txt").write_text("mine")
    before = tree(proj)
    for out in (proj, proj / "hf", tmp_path):  # parent of the input, the input, grandparent
        rc, err = cli(capsys, "convert", proj / "hf", out, "--force", "--quiet")
        assert rc == 2
        one_error(err, "convert", str(out))
    assert tree(proj) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_text("not ours")
    rc, err = cli(capsys, "convert", proj / "hf", foreign, "--force", "--quiet")
    assert rc == 2 and (foreign / "data.bin").read_text() == "not ours"
    one_error(err, "convert", str(foreign), "not a directory written by `dsv2 convert`")

    conv = tmp_path / "conv"
    assert cli(capsys, "convert", proj / "hf", conv, "--quiet")[0] == 0
    assert json.loads((conv / OUTPUT_MARKER).read_text())["kind"] == "convert"
    assert cli(capsys, "convert", proj / "hf", conv, "--force", "--quiet")[0] == 0  # our own output: replaced
    (conv / "my-notes.txt").write_text("added by the user")
    rc, err = cli(capsys, "convert", proj / "hf", conv, "--force", "--quiet")
    assert rc == 2 and (conv / "my-notes.txt").exists()
    one_error(err, "convert", "my-notes.txt")
    (conv / "my-notes.txt").unlink()

    # export: never over the input's parent, never over an HF directory it did not write (even a lookalike).
    rc, err = cli(capsys, "export", conv, tmp_path, "--force", "--quiet")
    assert rc == 2 and conv.is_dir()
    one_error(err, "export", "contains the input")
    rc, err = cli(capsys, "export", conv, proj / "hf", "--force", "--quiet")
    assert rc == 2
    one_error(err, "export", str(proj / "hf"))
    assert tree(proj) == before
    back = tmp_path / "back"
    assert cli(capsys, "export", conv, back, "--quiet")[0] == 0
    assert cli(capsys, "export", conv, back, "--force", "--quiet")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "conv", "foreign", "proj"]  # no temp left


# ---- 5. OS errors: one line naming the path, temp output removed --------------------------------------------

def test_full_disk_and_permission_errors_are_one_line(hf_v2, tmp_path, capsys, monkeypatch):
    conv = tmp_path / "conv"
    assert cli(capsys, "convert", hf_v2[0], conv, "--quiet")[0] == 0
    real_write = convert_mod.write_safetensors

    def full_disk(path, specs, get, metadata=None):
        Path(f"{path}.tmp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}.tmp")

    monkeypatch.setattr(convert_mod, "write_safetensors", full_disk)
    rc, err = cli(capsys, "export", conv, tmp_path / "hf", "--quiet")
    assert rc == 2
    one_error(err, "export", "No space left on device", ".tmp/model.safetensors.tmp")
    monkeypatch.setattr(convert_mod, "write_safetensors", real_write)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr("dsv2_jax.safe_output.tempfile.mkdtemp", read_only)
    rc, err = cli(capsys, "convert", hf_v2[0], tmp_path / "conv2", "--quiet")
    assert rc == 2
    one_error(err, "convert", f"{tmp_path}: Permission denied")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]

    # train: a workdir that cannot be created (its "parent" is a file)
    (tmp_path / "file").write_text("x")
    (tmp_path / "corpus.txt").write_text("hello world\n" * 50)
    rc, err = cli(capsys, "train", "--config", "tiny", "--workdir", tmp_path / "file" / "run", "--data",
                  tmp_path / "corpus.txt", "--no-progress", "--set", "seq_len=16", "--set", "global_batch=2")
    assert rc == 2
    one_error(err, "train", str(tmp_path / "file"))


# ---- 6. stale temps of killed runs are cleaned up (only ours, only when the writer is gone); Ctrl-C ----------

def test_stale_temps_are_removed_and_ctrl_c_is_one_line(hf_v2, tmp_path, capsys, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "conv"
    stale, live, foreign, other = (tmp_path / f".{n}.tmp" for n in ("conv.a1", "conv.b2", "conv.c3", "other.d4"))
    for d, pid in ((stale, dead.pid), (live, os.getpid()), (foreign, None), (other, dead.pid)):
        d.mkdir()
        (d / "big.bin").write_bytes(b"x" * 100)
        if pid is not None:
            (d / WRITER_RECORD).write_text(json.dumps({"tool": "dsv2-jax", "pid": pid, "host": os.uname().nodename}))
    from dsv2_jax import orbax_io

    calls = []
    real = orbax_io.OrbaxTreeWriter.write

    def interrupted(self, path, value, index=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, path, value, index)

    monkeypatch.setattr(orbax_io.OrbaxTreeWriter, "write", interrupted)
    rc, err = cli(capsys, "convert", hf_v2[0], out, "--quiet")
    assert rc == 130 and len(err) == 1 and err[0].startswith("dsv2 convert: interrupted"), err
    # the killed writer's temp is gone; a live writer's, an unmarked one and another output's stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, foreign, other))


# ---- 8. config parsing ----------------------------------------------------------------------------------------

def test_config_files_name_missing_fields(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for argv in (["info", hf], ["convert", hf, tmp_path / "out", "--quiet"],
                 ["generate", "--checkpoint", hf, "--prompt-ids", "1", "--json"]):
        rc, err = cli(capsys, *argv)
        assert rc == 2
        one_error(err, argv[0], str(hf / "config.json"), "missing required field(s)", "'q_lora_rank'", "'vocab_size'")
    partial = tmp_path / "model.json"
    partial.write_text(json.dumps({"vocab_size": 300, "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"model.json: missing required field\(s\) \['intermediate_size'"):
        ModelConfig.from_json(partial)
    rc, err = cli(capsys, "info", partial)
    one_error(err, "info", "missing required field(s)")
    rc, err = cli(capsys, "info", tmp_path / "nope" / "model.json")
    assert rc == 2
    one_error(err, "info", "no such file or directory")
    assert "preset" not in err[0]
    rc, err = cli(capsys, "info", ROOT / "configs" / "train-tiny.json")
    assert rc == 0, err
    info = json.loads(cli.out)
    assert info["train"]["model"] == "tiny" and info["layers"] == ModelConfig.preset("tiny").num_hidden_layers
