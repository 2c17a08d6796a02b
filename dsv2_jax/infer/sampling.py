"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus), all traced values.

Every knob is an array argument rather than a Python constant, so changing them never recompiles the decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jnp.ndarray, key: jax.Array, temperature, top_k, top_p) -> jnp.ndarray:
    """logits [B, V] → token ids [B] int32.

    temperature <= 0 is greedy (argmax); top_k <= 0 disables top-k; top_p >= 1 disables top-p. top-k is applied
    first, then top-p keeps the smallest prefix of the remaining tokens (by probability) whose mass reaches top_p.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ranked = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.clip(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1, k)  # the top token always stays
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
