"""Parameter values that are computed when their layer runs: int8 weights and LoRA-adapted weights.

A layer-stack parameter may hold, instead of an array,
  * a `qwix.QArray` (int8 values + per-channel scales, quantize.py): dequantized to the scales' dtype;
  * a `LoraWeight` (frozen base + low-rank A·B, lora.py): base + (alpha/rank)·A·B, the base itself possibly a
    QArray (QLoRA).
`scan_layers` materializes them one layer at a time inside the scan, so only int8 values (or the adapters) are
stored and one layer's full-precision weights exist at a time; gradients reach A and B through the scan.

Both kinds are addressed by one table, `projection_layout`: which stacked parameters are projections, how many of
their leading axes are batch-like (layers, experts) and how many are input axes (the rest are output axes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import qwix

ATTN_WEIGHTS = ("wq", "wq_a", "wq_b", "wkv_a", "w_uk", "w_uv", "wo")
MLP_WEIGHTS = ("w_gate", "w_up", "w_down")
TARGET_GROUPS = ("attn", "mlp", "shared", "experts")


def projection_layout(path: tuple) -> tuple[str, int, int] | None:
    """(group, batch axes, input axes) of a parameter path of the model tree, or None if not a projection.

    Groups: attn (MLA), mlp (dense layers' MLP), shared (shared experts), experts (routed, [L, E, in, out]).
    Batch axes count the leading "layers" axis (and "expert"); wo [L, H, V, D] has two input axes.
    """
    path = tuple(str(p) for p in path)
    if path[0] not in ("dense_layers", "moe_layers") or len(path) < 3:
        return None
    name = path[-1]
    if path[1] == "attn" and name in ATTN_WEIGHTS:
        return ("attn", 1, 2 if name == "wo" else 1)
    if path[1] != "mlp" or name not in MLP_WEIGHTS:
        return None
    if path[0] == "dense_layers":
        return ("mlp", 1, 1)
    return ("shared", 1, 1) if path[2] == "shared" else ("experts", 2, 1)


def matches(path: tuple, targets) -> bool:
    """Whether a projection belongs to `targets` (group names or parameter names such as 'wq_b')."""
    layout = projection_layout(path)
    return layout is not None and (layout[0] in targets or str(path[-1]) in targets)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """base [*batch, *in, *out] + scale · A [*batch, *in, r] · B [*batch, r, *out]."""
    base: jax.Array | qwix.QArray
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    n_in: int = dataclasses.field(metadata=dict(static=True))

    def delta(self) -> jax.Array:
        r = self.a.shape[-1]
        n_batch = self.a.ndim - self.n_in - 1
        batch, ins, outs = self.a.shape[:n_batch], self.a.shape[n_batch:-1], self.b.shape[n_batch + 1:]
        ab = jnp.matmul(self.a.reshape(*batch, math.prod(ins), r), self.b.reshape(*batch, r, math.prod(outs)))
        return (self.scale * ab).reshape(*batch, *ins, *outs)


def _is_lazy(x) -> bool:
    return isinstance(x, (qwix.QArray, LoraWeight))


def materialize_leaf(x):
    if isinstance(x, qwix.QArray):
        return qwix.dequantize(x)
    if isinstance(x, LoraWeight):
        base = materialize_leaf(x.base)
        return base + x.delta().astype(base.dtype)
    return x


def materialize(tree):
    """The same tree with every QArray / LoraWeight replaced by its full-precision array."""
    return jax.tree.map(materialize_leaf, tree, is_leaf=_is_lazy)
