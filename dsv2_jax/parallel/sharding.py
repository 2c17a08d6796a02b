"""Device mesh and parameter / batch placement for training.

Mesh axes:
  data   — pure data parallelism (replicated weights; gradients all-reduced);
  fsdp   — data parallelism with weights sharded along "embed" (gathered per layer inside the scan);
  expert — expert parallelism: routed experts split over it; it also splits the batch for the dense parts,
           as DeepSeek-V2 does, so expert-parallel devices never duplicate attention work;
  tensor — Megatron-style splits of heads / MLP width / vocabulary.
Every parameter carries logical axis names (`layers.param`); LOGICAL_RULES is the ONE table mapping them to mesh
axes, so changing a placement is a one-line edit here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
# Mesh axes that shard weights only at rest: a layer all-gathers its weights over them before computing (FSDP).
STORAGE_ONLY_AXES = ("fsdp",)
EXPERTS = "expert"  # the logical axis of stacked routed experts (MoE w_gate / w_up / w_down)

LOGICAL_RULES: dict[str, str | None] = {
    "layers": None,       # scanned stack: every device holds its slice of every layer
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "q_lora": None,       # low-rank bottlenecks are small; replicate
    "kv_lora": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "router": None,
    "norm": None,
}


def parse_mesh(spec: str | dict[str, int] | None) -> dict[str, int]:
    """'data=2,expert=4' (or a dict) → sizes for all four axes; unnamed axes are 1."""
    if spec is None or spec == "":
        return dict.fromkeys(MESH_AXES, 1)
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(f"mesh: expected AXIS=SIZE items like 'data=2,expert=4', got {part!r}")
            items[name.strip()] = int(value)
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown}; axes are {list(MESH_AXES)}")
    sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    if any(s < 1 for s in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be >= 1, got {sizes}")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over the first prod(sizes) devices (all of them when the sizes multiply to the device count)."""
    sizes = parse_mesh(spec)
    devices = list(devices if devices is not None else jax.devices())
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices, only {len(devices)} available "
                         f"(CPU: set XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    grid = np.asarray(devices[:n], dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one parameter; a dimension not divisible by its mesh axis stays replicated."""
    out = []
    for name, dim in zip(axes, shape):
        if name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")
        mesh_axis = LOGICAL_RULES[name]
        # Axes the mesh lacks (a decode-only mesh of tensor x expert, say) count as size 1.
        if mesh_axis is not None and (mesh.shape.get(mesh_axis, 1) == 1 or dim % mesh.shape[mesh_axis]):
            mesh_axis = None
        out.append(mesh_axis)
    return P(*out)


def compute_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The spec of a weight as a layer computes with it (e.g. inside shard_map): `logical_to_spec` with the
    storage-only axes (fsdp) gathered."""
    return P(*(None if a in STORAGE_ONLY_AXES else a for a in logical_to_spec(axes, shape, mesh)))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_specs(tree: Any, mesh: Mesh) -> Any:
    """PartitionSpecs for a tree holding nnx Variables with `axes` metadata (params, or optimizer moments that
    mirror them); every other leaf (step counters, scalars) is replicated."""
    def spec(x):
        if _is_variable(x):
            axes = x.get_metadata().get("axes")
            value = x.get_value() if hasattr(x, "get_value") else x.value
            s = P() if axes is None else logical_to_spec(axes, value.shape, mesh)
            return x.replace(s)
        return P()
    return jax.tree.map(spec, tree, is_leaf=_is_variable)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings matching `tree` leaf for leaf (usable as jit in/out_shardings and device_put targets)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh) -> P:
    """Rows [B, ...] split over the batch axes the mesh has (a decode-only mesh may lack data / fsdp)."""
    return P(tuple(a for a in BATCH_AXES if a in mesh.axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Numpy [B, T] arrays → global arrays split over BATCH_AXES. Single host: B is the global batch;
    multi-host: each process passes its own slice and the global array is assembled from them."""
    sharding = batch_sharding(mesh)
    b = next(iter(batch.values())).shape[0] * jax.process_count()
    if b % batch_divisor(mesh):
        raise ValueError(f"global batch {b} is not divisible by the batch-parallel mesh size {batch_divisor(mesh)}")
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
