"""Pallas kernels for DeepSeek-V2 MLA: latent-cache decode and prefill flash attention."""

from kernels_pallas.backends import BACKENDS, default_backend, resolve_backend
from kernels_pallas.flash_mla import flash_mla_attention
from kernels_pallas.mla_decode import mla_decode

__all__ = ["BACKENDS", "default_backend", "flash_mla_attention", "mla_decode", "resolve_backend"]
