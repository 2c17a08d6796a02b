"""Cached inference forward passes over the same DeepseekV2 module that training uses.

`prefill` runs the prompt with ordinary (expanded) causal attention and stores each layer's c_KV / k_rope in a
fresh latent cache; `decode_step` feeds one token per sequence and attends over the cache with weight absorption
(MLA.decode). Both are pure functions of (model, cache, tokens) meant to be jitted over `nnx.split` state with
the cache donated. Prompts are right-padded: row b holds its own tokens at positions 0..n_b-1, so padding sits
after every real token and causal attention never sees it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv2_jax.infer.latent_cache import LatentCache
from dsv2_jax.model.transformer import DeepseekV2, scan_layers
from dsv2_jax.model.rope import rope_tables


def prefill(model: DeepseekV2, cache: LatentCache, tokens: jnp.ndarray, lengths: jnp.ndarray):
    """tokens [B, T] right-padded, lengths [B] (1..T) → (logits [B, V] at each row's last prompt token, cache).

    The prompt takes the training path's attention (expanded, or the flash kernel); the cache (max_len >= T) is
    overwritten from position 0 and its lengths set to `lengths`.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(model.config, positions)
    token_mask = positions < lengths[:, None]

    def step(layer, x, _):
        a, latents = layer.attn.attend_sequence(layer.attn_norm(x), cos, sin, phase="prefill")
        h, _ = layer.feed_forward(x + a, token_mask)
        return h, latents

    h = model.embed_tokens(tokens)
    ckvs, kropes = [], []
    for (layers, _), ckv_g, krope_g in zip(model.layer_groups(), cache.ckv, cache.krope):
        h, (ckv, k_rope) = scan_layers(layers, h, step)
        ckvs.append(jax.lax.dynamic_update_slice(ckv_g, ckv.astype(ckv_g.dtype), (0, 0, 0, 0)))
        kropes.append(jax.lax.dynamic_update_slice(krope_g, k_rope.astype(krope_g.dtype), (0, 0, 0, 0)))
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.logits(last)[:, 0]
    return logits, LatentCache(tuple(ckvs), tuple(kropes), lengths.astype(jnp.int32))


def decode_step(model: DeepseekV2, cache: LatentCache, tokens: jnp.ndarray):
    """tokens [B] at positions cache.lengths → (logits [B, V], cache with the tokens appended).

    The cache rides in the scan carry with the layer index as the scanned input, so each layer writes its new
    token in place and reads its slice where it lies: no per-step copy of the cache.
    """
    lengths = cache.lengths
    cos, sin = rope_tables(model.config, lengths[:, None])

    def step(layer, carry, i):
        x, ckv, krope = carry
        return layer.decode(x, cos, sin, ckv, krope, i, lengths), None

    h = model.embed_tokens(tokens[:, None])
    ckvs, kropes = [], []
    for (layers, _), ckv_g, krope_g in zip(model.layer_groups(), cache.ckv, cache.krope):
        (h, ckv, krope), _ = scan_layers(layers, (h, ckv_g, krope_g), step, xs=jnp.arange(ckv_g.shape[0]))
        ckvs.append(ckv)
        kropes.append(krope)
    logits = model.logits(h)[:, 0]
    return logits, LatentCache(tuple(ckvs), tuple(kropes), lengths + 1)
