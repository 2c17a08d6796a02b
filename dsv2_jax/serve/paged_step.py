"""One jitted forward over the paged latent cache: chunked prefill and decode are the same function.

A batch is B rows of up to T new tokens each: row b continues its sequence at position starts[b] with n_new[b]
tokens (decode: T = 1). It is the ONE DeepseekV2 forward, called with the pool addressed by this batch's block
tables (`PagedLatentCache.for_batch`): every layer writes the new tokens' c_KV / k_rope into their pages (padding
writes go to the trash page) and attends with weight absorption over the row's pages (serve/paged_cache.py):
  * T = 1 (decode): `kernels_pallas.paged_mla_decode`, the Pallas kernel or its gather reference by the model's
    attention_impl;
  * T > 1 (prefill chunks): the pages are gathered and `MLA.attend_absorbed` runs with a causal mask over
    absolute positions, so a chunk sees the earlier chunks (and shared prefix pages) through the cache.
The next token of each row is sampled from the logits at its last new token, per row: temperature, top-k,
top-p and a key folded from (seed, index of the token being generated), so a request's samples do not depend on
what else is in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv2_jax.model.transformer import DeepseekV2
from dsv2_jax.infer.sampling import sample
from dsv2_jax.serve.paged_cache import PagedLatentCache


def paged_forward(model: DeepseekV2, cache: PagedLatentCache, tokens, starts, n_new, block_tables):
    """tokens [B,T] int32, starts [B], n_new [B] (0..T; 0 = padding row), block_tables [B,N] page ids covering
    positions < starts + n_new → (logits [B,V] fp32 at each row's last new token, cache with the tokens written).
    """
    offs = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    positions = starts[:, None] + offs                                           # [B,T]
    h, batch, _ = model.forward(tokens, positions, cache=cache.for_batch(block_tables, n_new),
                                token_mask=offs[None, :] < n_new[:, None])
    last = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)  # [B,1,D]
    return model.logits(last)[:, 0], batch.pool


def sample_rows(logits, seeds, steps, temperature, top_k, top_p):
    """Per-row sampling: logits [B,V]; seeds, steps, top_k [B] int32; temperature, top_p [B] fp32 → [B] int32."""
    def one(lg, seed, step, temp, k, p):
        return sample(lg[None], jax.random.fold_in(jax.random.key(seed), step), temp, k, p)[0]
    return jax.vmap(one)(logits, seeds, steps, temperature, top_k, top_p)


def _step_and_sample(graphdef, state, cache, tokens, starts, n_new, block_tables, seeds, steps, temperature, top_k,
                     top_p):
    logits, cache = paged_forward(nnx.merge(graphdef, state), cache, tokens, starts, n_new, block_tables)
    return sample_rows(logits, seeds, steps, temperature, top_k, top_p), cache


# (graphdef, state, cache, tokens [B,T], starts, n_new, block_tables [B,N], seeds, steps, temperature, top_k,
#  top_p) -> (next token per row [B], cache); the cache is donated.
step_and_sample = jax.jit(_step_and_sample, static_argnums=0, donate_argnums=2)
