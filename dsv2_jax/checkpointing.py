"""Orbax checkpoints of a training run: train state (params, optimizer state, step) + the grain iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Saves are asynchronous (the step loop continues while arrays are
written) and atomic (Orbax writes to a temporary directory and renames), so a run killed mid-save resumes from
the previous complete checkpoint. The data iterator's state is written per process by grain's handler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv2_jax.data import data_checkpoint_args


class RunCheckpoints:
    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
        self.manager.close()


# Where a train state's parameter p lives inside its Orbax tree (nnx.State leaves are saved as {"value": array}).
PARAMS_PREFIX, PARAMS_SUFFIX = ("params",), ("value",)


def latest_state_dir(workdir: str | Path) -> Path:
    """The train-state directory of the newest finished checkpoint of a run (in-progress saves are skipped)."""
    directory = Path(workdir).absolute() / "checkpoints"
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{directory}: no finished training checkpoint")
    return directory / str(steps[-1]) / "state"


def latest_params(workdir: str | Path, target: dict) -> dict:
    """The newest checkpoint's parameters only (no optimizer state), restored into `target` (a pure dict of
    ShapeDtypeStructs with shardings and the dtypes wanted): for decoding or exporting a training run."""
    item = {"params": jax.tree.map(lambda s: {"value": s}, target)}  # partial_restore skips opt_state and step
    restored = ocp.PyTreeCheckpointer().restore(
        latest_state_dir(workdir),
        args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                    partial_restore=True))
    return jax.tree.map(lambda v: v["value"], restored["params"], is_leaf=lambda x: isinstance(x, dict) and "value" in x)

