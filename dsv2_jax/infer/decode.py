"""Cached inference: the model's own forward with a latent cache (model/layer_cache.py says what a layer does).

`prefill` runs the prompt into an empty (`LatentCache.zeros`) cache: the tokens attend to each other with the
training path's attention and each layer stores its c_KV / k_rope; `decode_step` feeds one token per sequence,
which attends over the cache with weight absorption. Both are pure functions of (model, cache, tokens) meant to be
jitted over `nnx.split` state with the cache donated. Prompts are right-padded: row b holds its own tokens at
positions 0..n_b-1, so padding sits after every real token and causal attention never sees it.
"""

from __future__ import annotations

import jax.numpy as jnp

from dsv2_jax.infer.latent_cache import LatentCache
from dsv2_jax.model.transformer import DeepseekV2


def prefill(model: DeepseekV2, cache: LatentCache, tokens: jnp.ndarray, lengths: jnp.ndarray):
    """tokens [B, T] right-padded, lengths [B] (1..T), an empty cache (max_len >= T) → (logits [B, V] at each
    row's last prompt token, cache holding the prompts)."""
    if not cache.fresh:
        raise ValueError("prefill writes from position 0: pass an empty cache (LatentCache.zeros)")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, cache, _ = model.forward(tokens, positions, cache=cache, token_mask=positions < lengths[:, None])
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return model.logits(last)[:, 0], cache.replace(lengths=lengths.astype(jnp.int32))


def decode_step(model: DeepseekV2, cache: LatentCache, tokens: jnp.ndarray):
    """tokens [B] at positions cache.lengths → (logits [B, V], cache with the tokens appended).

    The cache rides in each layer scan's carry, so each layer writes its new token in place and its attention
    reads the layer where it lies: no per-step copy of the cache.
    """
    h, cache, _ = model.forward(tokens[:, None], cache.lengths[:, None], cache=cache)
    return model.logits(h)[:, 0], cache.replace(lengths=cache.lengths + 1)
