"""Building blocks shared by MLA and MoE: parameter creation with logical axes, RMSNorm, SwiGLU MLP.

Every parameter carries `axes`: logical axis names (one per dimension) that `sharding.py` maps onto mesh axes.
Layer stacks are built by passing `stack=(L,)`: the parameter gets a leading "layers" dimension and the
module's __call__ runs on one slice of it inside a scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

def param(shape, axes, dtype, stack=(), fill: float = 0.0) -> nnx.Param:
    """A parameter of shape stack+shape filled with `fill`; weights come from a checkpoint or `init_model`."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.full(tuple(stack) + tuple(shape), fill, dtype),
                     axes=("layers",) * len(stack) + tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis_name: str = "norm", stack=()):
        self.scale = param((dim,), (axis_name,), dtype, stack, fill=1.0)
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # Normalise in fp32 and cast back before the scale, as the reference does.
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x·W_gate) * x·W_up); used for dense layers and the shared experts."""

    def __init__(self, hidden: int, inter: int, dtype, stack=(), inter_axis: str = "mlp"):
        self.w_gate = param((hidden, inter), ("embed", inter_axis), dtype, stack)
        self.w_up = param((hidden, inter), ("embed", inter_axis), dtype, stack)
        self.w_down = param((inter, hidden), (inter_axis, "embed"), dtype, stack)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])
        return h @ self.w_down[...]
