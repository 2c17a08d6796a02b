"""Rotary position embedding with YaRN, in the checkpoints' interleaved-pair layout.

DeepSeek-V2 checkpoints store each rope sub-vector as adjacent pairs (x[2i], x[2i+1]); rotating those pairs as
complex numbers is exactly the reference's de-interleave + rotate_half, without the transpose.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv2_jax.config import ModelConfig, yarn_mscale


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[rope_dim/2] inverse frequencies, YaRN-blended between interpolation and extrapolation when enabled."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if not cfg.yarn_enabled:
        return extrapolation.astype(np.float32)
    interpolation = 1.0 / (cfg.rope_factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN's cos/sin magnitude: m(mscale)/m(mscale_all_dim) (1.0 for the released V2 configs)."""
    if not cfg.yarn_enabled:
        return 1.0
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape positions.shape + [rope_dim/2], float32, already scaled by the YaRN factor."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
    scale = attention_factor(cfg)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates adjacent pairs of x [..., T, (heads,) rope_dim]; cos/sin [..., T, rope_dim/2] broadcast over heads."""
    if x.ndim == cos.ndim + 1:  # x has a heads axis after T
        cos, sin = cos[..., None, :], sin[..., None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
