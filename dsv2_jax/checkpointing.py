"""Orbax checkpoints of a training run: train state (params, optimizer state, step) + the grain iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Saves are asynchronous (the step loop continues while arrays are
written) and atomic (Orbax writes to a temporary directory and renames), so a run killed mid-save resumes from
the previous complete checkpoint. The data iterator's state is written per process by grain's handler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointRestore, CheckpointSave


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
                                                        data=CheckpointSave(data_iterator)))

    def restore(self, step: int, target: Any, data_iterator) -> Any:
        """Restores the train state into `target` (abstract arrays with shardings) and the iterator in place."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 data=CheckpointRestore(data_iterator)))
        return out.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
