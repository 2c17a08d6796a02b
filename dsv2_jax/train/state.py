"""The sharded train state and the jitted train step.

State is a plain pytree {"params", "opt_state", "step"}: fp32 master parameters as an nnx.State (Variables keep
their logical `axes`, and so do the AdamW moments mirroring them, which is how both get their shardings), the
optax state and the step counter. `train_step` is a pure function jitted with jax.jit, in/out shardings from
sharding.py and the state donated; parameters are cast to the compute dtype inside it (`model.precision` keeps
the router fp32). On several devices the model's MoE layers run the expert-parallel dispatch
(`expert_parallel.dispatch_for`), one for training (it may drop tokens) and one for eval (it never does).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.precision import cast_params
from dsv2_jax.ops.attention_backend import current_platform
from dsv2_jax.parallel.expert_parallel import dispatch_for, use_dispatch
from dsv2_jax.train.losses import balance_loss, balance_weights, cross_entropy, expert_load
from dsv2_jax.model.transformer import abstract_model, random_state
from dsv2_jax.train.schedule import learning_rate, make_optimizer
from dsv2_jax.parallel.sharding import batch_sharding, tree_shardings
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.host_heap import keep_freed_heap

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def unroll_layers(tc: TrainConfig) -> bool:
    """tc.unroll_layers, or by default: the step is traced for CPU (attention_backend.current_platform: the
    target of an export too) without remat. XLA:CPU pays per loop iteration for slicing every stacked weight
    and stacking every residual and gradient, ~1/8 of the tiny model's step; accelerators keep the loop, and so
    does remat, which is asked for to save memory (unrolled, XLA schedules more of the recomputation at once)."""
    if tc.unroll_layers is not None:
        return tc.unroll_layers
    return current_platform() == "cpu" and tc.remat == "none"


def _abstract(mesh):
    return mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh


class BoundStep:
    """A jitted step with trailing arguments bound: called (and lowered) as step(state, batch)."""

    def __init__(self, jitted, *bound):
        self.jitted, self.bound = jitted, bound
        self.__name__ = getattr(jitted, "__name__", "step")

    def __call__(self, *args):
        return self.jitted(*args, *self.bound)

    def lower(self, *args):
        return self.jitted.lower(*args, *self.bound)


class Trainer:
    """Builds the optimiser, shardings and the compiled step for one (TrainConfig, mesh)."""

    def __init__(self, tc: TrainConfig, mesh: Mesh, cfg: ModelConfig | None = None):
        self.tc, self.mesh = tc, mesh
        if jax.default_backend() == "cpu":  # XLA:CPU's per-step temp buffers: see host_heap.py
            keep_freed_heap()
        self.cfg = cfg or tc.model_config()
        self.tx = make_optimizer(tc)
        self.schedule = learning_rate(tc)
        self.graphdef, _ = nnx.split(abstract_model(self.cfg, jnp.float32))
        self.compute_dtype = jnp.dtype(tc.compute_dtype)
        self.dispatch = dispatch_for(self.cfg, mesh, mode=tc.moe_dispatch, capacity_factor=tc.capacity_factor,
                                     train=True, seq_len=tc.seq_len, never_drop_every=tc.never_drop_every)
        self.eval_dispatch = dispatch_for(self.cfg, mesh, mode=tc.moe_dispatch, capacity_factor=tc.capacity_factor)
        self.abstract_state = jax.eval_shape(lambda: self._init(0))
        self.state_shardings = tree_shardings(self.abstract_state, mesh)
        self.batch_sharding = batch_sharding(mesh)
        self.init_state = jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings)
        # The balance-loss weights are an argument, not constants: runs that differ only in them (with and
        # without balance losses) share one compiled step.
        self.balance_weights = balance_weights(self.cfg)
        self.weights_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step = jax.jit(self._train_step, donate_argnums=0,
                       in_shardings=(self.state_shardings, {k: self.batch_sharding for k in BATCH_KEYS},
                                     self.weights_sharding),
                       out_shardings=(self.state_shardings, None))
        self.step = BoundStep(step, self.balance_weights)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_shardings["params"],
                                                                {k: self.batch_sharding for k in BATCH_KEYS}))

    def _init(self, seed: int) -> dict[str, Any]:
        # XLA:CPU compiles partitionable threefry ~10x slower (30 s for the tiny model); on CPU, sharded and
        # unsharded inits still agree without it. Accelerators keep it: it generates each shard locally.
        with jax.threefry_partitionable(jax.default_backend() != "cpu"):
            params = random_state(self.cfg, jax.random.key(seed), jnp.float32)
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def restore_target(self) -> Any:
        """The abstract state with shardings attached (what Orbax restores into)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def model_for(self, params, frozen=None):
        """The model a step runs: `params` cast to the compute dtype (LoraTrainer adds its frozen base)."""
        return nnx.merge(self.graphdef, cast_params(params, self.compute_dtype))

    def loss(self, params, batch, frozen=None, weights=None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        model = use_dispatch(self.model_for(params, frozen), self.dispatch)
        with jax.sharding.use_abstract_mesh(_abstract(self.mesh)):  # attention kernels run per shard (shard_map)
            logits, stats = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                                  token_mask=batch["segment_ids"] > 0, return_aux=True, remat=self.tc.remat,
                                  unroll=unroll_layers(self.tc))
        ce = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        aux, terms = balance_loss(stats, self.cfg, weights)
        metrics = {"ce_loss": ce, "aux_loss": aux, **terms}
        load = expert_load(stats)
        if load is not None:
            metrics["expert_load"] = load
        return ce + aux, metrics

    def _eval_step(self, params, batch, frozen=None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(summed next-token NLL, number of scored tokens) of one batch: no balance losses, no token dropping."""
        model = use_dispatch(self.model_for(params, frozen), self.eval_dispatch)  # eval never drops
        with jax.sharding.use_abstract_mesh(_abstract(self.mesh)):
            logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], unroll=unroll_layers(self.tc))
        tokens = batch["loss_mask"].sum()
        return cross_entropy(logits, batch["targets"], batch["loss_mask"]) * tokens, tokens

    def _train_step(self, state, batch, weights, frozen=None):
        (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], batch, frozen,
                                                                             weights)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=self.schedule(state["step"]))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
