"""Per-device memory of a training or serving setup, planned before any device exists.

    plan = memory_plan(ModelConfig.preset("deepseek-v2-lite"), "fsdp=8,expert=8", seq_len=4096, batch=64)

Everything is derived from JAX's own abstract evaluation, on an AbstractMesh (no devices needed):
  * parameters and optimizer state: the Trainer's abstract state and its shardings (LOGICAL_RULES), shard by
    shard: fp32 master weights, AdamW's two moments;
  * gradients: one fp32 copy of the parameters, sharded like them;
  * activations: the residuals the backward pass keeps under the remat policy (traced with jax.vjp on one
    device's share of the batch), plus the working set of the one layer being differentiated
    (LAYER_COPIES); tensor-parallel splits of activations are not subtracted (an upper bound when tensor > 1);
  * cache: the decode-time latent cache (c_KV + k_rope per token per layer) for `batch` rows of `seq_len`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.transformer import DeepseekV2, abstract_model, scan_layers
from dsv2_jax.model.rope import rope_tables
from dsv2_jax.parallel.sharding import BATCH_AXES, MESH_AXES, parse_mesh

CACHE_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device."""

    mesh: dict
    seq_len: int
    batch: int
    remat: str
    params: int
    optimizer: int
    gradients: int
    activations: int
    cache: int

    @property
    def train_total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "train_total": self.train_total}


def abstract_mesh(spec: str | dict | None) -> AbstractMesh:
    sizes = parse_mesh(spec)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs / arrays) laid out by `shardings`."""
    def one(x, s):
        return math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return sum(jax.tree.leaves(jax.tree.map(one, tree, shardings)))


def residual_bytes(f, *args) -> int:
    """Bytes of what jax.vjp(f, *args) keeps for the backward pass, excluding the arguments themselves."""
    leaves = jax.tree.leaves(args)
    closed, shapes = jax.make_jaxpr(lambda *a: jax.vjp(lambda *b: f(*jax.tree.unflatten(jax.tree.structure(args), b)),
                                                      *a), return_shape=True)(*leaves)
    n_res = len(jax.tree.leaves(shapes[1]))
    inputs = set(closed.jaxpr.invars) | set(closed.jaxpr.constvars)
    seen, total = set(), 0
    for v in closed.jaxpr.outvars[len(closed.jaxpr.outvars) - n_res:]:
        if isinstance(v, jax.extend.core.Var) and v not in inputs and v not in seen:
            seen.add(v)
            total += v.aval.size * v.aval.dtype.itemsize
    return total


def activation_parts(cfg: ModelConfig, local_batch: int, seq_len: int, remat: str, compute_dtype) -> tuple[int, int]:
    """(residuals the loss's backward keeps on `local_batch` rows under the remat policy, the largest layer's
    intermediates when nothing is rematerialised)."""
    from dsv2_jax.train.losses import cross_entropy

    graphdef, state = nnx.split(abstract_model(cfg, compute_dtype))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    ids = jax.ShapeDtypeStruct((local_batch, seq_len), jnp.int32)

    def loss(state, ids):
        model: DeepseekV2 = nnx.merge(graphdef, state)
        return cross_entropy(model(ids, remat=remat), ids, jnp.ones(ids.shape, jnp.float32))

    x = jax.ShapeDtypeStruct((local_batch, seq_len, cfg.hidden_size), compute_dtype)
    cos, sin = rope_tables(cfg, jnp.zeros((local_batch, seq_len), jnp.int32))
    per_layer = []
    for group, _ in nnx.merge(graphdef, state).layer_groups():
        g_def, g_state = nnx.split(group)
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype), g_state)

        def run(s, h, g_def=g_def):
            out, _ = scan_layers(nnx.merge(g_def, s), h, lambda layer, y, _: layer(y, (cos, sin))[::2])  # (h, stats)
            return out.astype(jnp.float32).sum()

        per_layer.append(residual_bytes(run, one, x))
    return residual_bytes(loss, state, ids), max(per_layer)


# Live copies of one layer's intermediates while it is differentiated, beyond the saved residuals: a fraction
# of them for the cotangents when nothing is rematerialised; with remat, also the recomputed intermediates and
# the recompute's own temporaries. Fitted (not derived) to XLA's CPU memory analysis of the train step with the
# blocked grouped GEMM (tests/test_memory_plan.py): none 0.3, full 1.65; dots assumed as full.
LAYER_COPIES = {"none": 0.3, "dots": 1.65, "full": 1.65}


def activation_bytes(cfg: ModelConfig, local_batch: int, seq_len: int, remat: str, compute_dtype) -> int:
    """Peak activation bytes of one device's backward pass: the saved residuals plus the layer being
    differentiated (LAYER_COPIES of its intermediates)."""
    saved, layer = activation_parts(cfg, local_batch, seq_len, remat, compute_dtype)
    return int(saved + LAYER_COPIES[remat] * layer)


# Attention cores as the plan traces them: "flash" (what GPUs / TPUs run: no [T, T] scores; the Pallas kernel's
# residuals stand in for tokamax's, which are the same q, k, v, o and softmax statistics) or "xla".
ATTENTION_IMPLS = {"flash": "pallas", "xla": "xla"}


def memory_plan(cfg: ModelConfig, mesh: str | dict | None, seq_len: int, batch: int, remat: str = "none",
                compute_dtype: str = "bfloat16", moe_dispatch: str = "dropless",
                attention: str = "flash") -> MemoryPlan:
    """Per-device bytes for training `batch` sequences of `seq_len` on `mesh` (and decoding them)."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_IMPLS)}, got {attention!r}")
    from dsv2_jax.train.config import TrainConfig
    from dsv2_jax.train.state import Trainer

    amesh = abstract_mesh(mesh)
    divisor = math.prod(amesh.shape[a] for a in BATCH_AXES)
    if batch % divisor:
        raise ValueError(f"batch {batch} is not divisible by the batch-parallel mesh size {divisor}")
    tc = TrainConfig(seq_len=seq_len, global_batch=batch, remat=remat, compute_dtype=compute_dtype,
                     moe_dispatch=moe_dispatch)
    trainer = Trainer(tc, amesh, cfg)
    state, shardings = trainer.abstract_state, trainer.state_shardings
    params = device_bytes(state["params"], shardings["params"])
    local = batch // divisor
    cache = cfg.num_hidden_layers * local * seq_len * cfg.latent_cache_dim * jnp.dtype(CACHE_DTYPE).itemsize
    return MemoryPlan(mesh=dict(amesh.shape), seq_len=seq_len, batch=batch, remat=remat, params=params,
                      optimizer=device_bytes(state["opt_state"], shardings["opt_state"]), gradients=params,
                      activations=activation_bytes(cfg.replace(attention_impl=ATTENTION_IMPLS[attention]), local,
                                                   seq_len, remat, jnp.dtype(compute_dtype)),
                      cache=cache)
