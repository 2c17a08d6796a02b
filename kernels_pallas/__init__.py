"""Pallas kernels for DeepSeek-V2 MLA: latent-cache decode and prefill flash attention."""

import jax

BACKENDS = ("interpret", "mosaic_gpu", "mosaic_tpu", "xla")


def default_backend() -> str:
    """Kernel backend for the default JAX platform ("xla" = pure-JAX reference)."""
    return {"gpu": "mosaic_gpu", "tpu": "mosaic_tpu"}.get(jax.default_backend(), "xla")


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return backend


# Defined above before the submodules import them from this package.
from kernels_pallas.flash_mla import flash_mla_attention  # noqa: E402
from kernels_pallas.mla_decode import mla_decode  # noqa: E402

__all__ = ["default_backend", "flash_mla_attention", "mla_decode"]
