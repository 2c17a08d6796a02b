"""The one dtype policy: which parameters stay fp32 whatever the model or compute dtype.

The reference computes the MoE gate in fp32 even for bf16 models, so the router weight is held, loaded,
converted, cast for compute and counted in fp32. Model construction, checkpoint loading and conversion, the
trainer's compute cast (LoRA's included) and the quantizer's memory report all ask this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP32_PARAMS = frozenset({"w_router"})  # parameter names (the leaf's own key), not substrings of paths


def _names(path) -> list:
    """Key names of a path: plain strings, or jax tree-path entries (DictKey / GetAttrKey / SequenceKey)."""
    if isinstance(path, str):
        return [path]
    return [getattr(k, "key", getattr(k, "name", k)) for k in path]


def keeps_fp32(path) -> bool:
    """True for a parameter named in FP32_PARAMS; `path` is its name, a tuple of keys or a jax key path."""
    return any(name in FP32_PARAMS for name in _names(path))


def param_dtype(path, dtype) -> np.dtype:
    """The dtype parameter `path` is held in for a model of `dtype`."""
    return np.dtype(np.float32) if keeps_fp32(path) else np.dtype(dtype)


def cast_params(params, dtype):
    """Every floating leaf of `params` (any pytree: nnx.State, pure dict) cast to `dtype`, except FP32_PARAMS."""
    def cast(path, x):
        if keeps_fp32(path) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, params)
