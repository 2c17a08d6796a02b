"""Whether a train state may be checkpointed: a diverged state must never become "the last good checkpoint".

The loss a step reports was computed *before* its update, so a finite loss says nothing about the parameters
the step produced (lr=inf turns them all into NaN; lr=1e9 into ~1e8 values whose next loss is NaN). So before
a save the parameters themselves are checked: all finite, and a finite loss on the batch just trained on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def unsaveable(trainer, params, batch) -> str | None:
    """Why `params` must not be saved (e.g. "non-finite parameters"), or None if they may.

    trainer: a train_state.Trainer (its jitted eval_step scores `batch`, a sharded batch dict of dsv2_jax.train.data).
    """
    if not bool(_all_finite(params)):
        return "parameters (NaN/Inf after the update)"
    nll, tokens = trainer.eval_step(params, batch)
    loss = float(nll) / max(float(tokens), 1.0)
    if not math.isfinite(loss):
        return f"loss of the updated parameters ({loss})"
    return None
