"""Orbax checkpoints of a training run: train state (params, optimizer state, step) + the grain iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Saves are asynchronous (the step loop continues while arrays are
written) and atomic (Orbax writes to a temporary directory and renames), so a run killed mid-save resumes from
the previous complete checkpoint. The data iterator's state is written per process by grain's handler.
A newest checkpoint that does not restore (truncated files) is moved aside to `<step>.corrupt` and the run
resumes from the newest one that does; the workdir is locked against a second run (workdir_lock.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv2_jax.config import ConfigError, ModelConfig
from dsv2_jax.train.data import data_checkpoint_args
from dsv2_jax.errors import one_line
from dsv2_jax.checkpoint.safetensors_io import CheckpointError
from dsv2_jax.train.workdir_lock import WorkdirLock

MODEL_CONFIG_FILE = "dsv2_config.json"
# ModelConfig fields that choose an implementation, not the architecture: a resumed run may change them.
IMPLEMENTATION_FIELDS = ("moe_impl", "attention_impl")


class RunCheckpoints:
    """The checkpoints of one run. Holds the workdir's lock (process 0) from construction until `close()`."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        # Taken before Orbax's manager starts: it cleans up the unfinished saves it finds, a live run's included.
        self._lock = WorkdirLock(self.workdir) if jax.process_index() == 0 else None
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, item_names=("state", "data"),
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True))
        except BaseException:
            self._release()
            raise

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_model_config(self, cfg: ModelConfig) -> None:
        """Refuses to resume the checkpoints of a different architecture (one line listing the fields)."""
        stored_file = self.workdir / MODEL_CONFIG_FILE
        if self.manager.latest_step() is None or not stored_file.is_file():
            return
        stored = ModelConfig.from_json(stored_file).to_dict()
        new = cfg.to_dict()
        changed = [f"{k} {stored[k]!r} -> {new[k]!r}" for k in new
                   if k not in IMPLEMENTATION_FIELDS and stored.get(k) != new[k]]
        if changed:
            raise ConfigError(f"{self.workdir}: its checkpoints are of a different model ({'; '.join(changed)}); "
                              "resume with the model settings the run was started with, or use a new --workdir")

    def restore_latest(self, target: Any, data_iterator) -> tuple[int, Any]:
        """(step, train state) of the newest checkpoint that restores, the iterator restored in place; (0, None)
        when there is none.

        A newer checkpoint that does not restore (truncated or corrupt files) is kept but moved aside to
        `<step>.corrupt`, with a warning naming it; if none restores, CheckpointError names the newest.
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                _check_data_state(self.directory / str(step))
                state = self.restore(step, target, data_iterator)
            except Exception as e:  # noqa: BLE001 - whatever the reader trips on, this checkpoint is unusable
                failed.append((step, one_line(e)))
                continue
            for bad, why in failed:
                aside = _free_name(self.directory / f"{bad}.corrupt")
                if jax.process_index() == 0:
                    os.replace(self.directory / str(bad), aside)
                print(f"warning: checkpoint step {bad} does not restore ({why}); moved it to {aside} and resuming "
                      f"from step {step}", file=sys.stderr)
            if failed:
                self.manager.reload()
            return step, state
        if failed:
            step, why = failed[0]
            raise CheckpointError(f"{self.directory / str(step)}: checkpoint does not restore ({why}) and no older "
                                  "one does; move the checkpoints directory aside to start over")
        return 0, None

    def save(self, step: int, state: Any, data_iterator) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=data_checkpoint_args(data_iterator)))

    def restore(self, step: int, target: Any, data_iterator) -> Any:
        """Restores the train state into `target` (abstract arrays with shardings) and the iterator in place."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 data=data_checkpoint_args(data_iterator, restore=True)))
        return out.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... whichever does not exist yet."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}.{k}")
    return candidate


def _check_data_state(step_dir: Path) -> None:
    """The data iterator's saved state must be a JSON object (grain's own error names no file)."""
    for f in sorted((step_dir / "data").glob("*.json")):
        try:
            ok = isinstance(json.loads(f.read_text()), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise CheckpointError(f"{f}: corrupt data iterator state (not a JSON object)")


# Where a train state's parameter p lives inside its Orbax tree (nnx.State leaves are saved as {"value": array}).
PARAMS_PREFIX, PARAMS_SUFFIX = ("params",), ("value",)


def latest_state_dir(workdir: str | Path) -> Path:
    """The train-state directory of the newest finished checkpoint of a run (in-progress saves are skipped)."""
    directory = Path(workdir).absolute() / "checkpoints"
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{directory}: no finished training checkpoint")
    return directory / str(steps[-1]) / "state"
