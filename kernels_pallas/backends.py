"""Kernel backends and which one each JAX platform compiles.

The kernels take an explicit backend; choosing one for a model config and phase is
dsv2_jax.ops.attention_backend's job (this module only names what exists).
"""

import jax

BACKENDS = ("interpret", "mosaic_gpu", "mosaic_tpu", "xla")
_PLATFORM_BACKENDS = {"gpu": "mosaic_gpu", "cuda": "mosaic_gpu", "tpu": "mosaic_tpu"}


def default_backend(platform: str | None = None) -> str:
    """Kernel backend for `platform` (default: JAX's default platform); "xla" = pure-JAX reference."""
    return _PLATFORM_BACKENDS.get(platform or jax.default_backend(), "xla")


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return backend
