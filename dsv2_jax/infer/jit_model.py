"""A model split for jitted steps that run once per token: a static half hashed once, and a flat list of arrays.

`jax.jit` hashes its static arguments and flattens its pytree arguments on every call, in Python for nnx types:
for the tiny preset an nnx GraphDef costs ~0.3 ms to hash and its State ~0.09 ms to flatten, while a whole call
with a flat array list costs ~0.04 ms. Every decode engine pays this per step, so they pass a `ModelDef` (interned:
equal models share one, so their compiled steps are shared too; hashed by identity) and the state's leaves.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx


class ModelDef:
    """The static half of a split model (nnx GraphDef + the state's PyTreeDef); compares and hashes by identity."""

    __slots__ = ("graphdef", "treedef")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef

    def merge(self, leaves: list) -> nnx.Module:
        """The module over `leaves` (inside a jitted function: tracers)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@functools.lru_cache(maxsize=64)
def _intern(graphdef, treedef) -> ModelDef:
    return ModelDef(graphdef, treedef)


def split_for_jit(model: nnx.Module) -> tuple[ModelDef, list[jax.Array]]:
    """model → (its interned ModelDef, its state's leaves): the arguments of the engines' jitted steps."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return _intern(graphdef, treedef), leaves
