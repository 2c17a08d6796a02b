"""One jitted forward over the paged latent cache per scheduler step: decode tokens and prefill chunks packed.

A step is N token rows, one new token each, of any mix of sequences (Sarathi / vLLM-style mixed batches): row i is
token tokens[i] of the sequence whose block table is block_tables[i], at position positions[i]; a prefill chunk of
n tokens is n consecutive rows sharing one table, a decoding sequence one row. Padding rows (valid 0) write to the
trash page. It is the ONE DeepseekV2 forward, called as a [N, 1] batch with the pool addressed by the rows' tables
(`PagedLatentCache.for_batch`): token-wise work (projections, MoE, norms) costs N rows, not rows × chunk bucket,
and there is one call per step whatever mix it holds. In every layer all N rows write their c_KV / k_rope into their
pages first, then each row attends over its table's positions <= its own (lengths = position + 1) with the paged
decode kernel (`kernels_pallas.paged_mla_decode`, or its gather reference by the model's attention_impl) — so a
chunk's tokens see each other, the earlier chunks and any shared prefix pages, causally, in one call.

Only each sequence's last row of the step is sampled: sample_idx [R] picks those rows' hidden states for the
vocabulary projection, then temperature, top-k, top-p and a key folded from (seed, index of the token being
generated), per sequence, so a request's samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv2_jax.model.transformer import DeepseekV2
from dsv2_jax.infer.sampling import sample
from dsv2_jax.serve.paged_cache import PagedLatentCache


def packed_forward(model: DeepseekV2, cache: PagedLatentCache, tokens, positions, valid, block_tables, sample_idx):
    """tokens, positions, valid [N] int32 (valid 0: a padding row); block_tables [N, W] page ids covering each
    row's positions <= positions[i]; sample_idx [R] rows to project → (logits [R, V] fp32, cache with the tokens
    written)."""
    h, batch, _ = model.forward(tokens[:, None], positions[:, None], cache=cache.for_batch(block_tables, valid),
                                token_mask=valid[:, None] > 0)
    return model.logits(h[sample_idx])[:, 0], batch.pool


def sample_rows(logits, seeds, steps, temperature, top_k, top_p):
    """Per-row sampling: logits [R,V]; seeds, steps, top_k [R] int32; temperature, top_p [R] fp32 → [R] int32.
    An all-greedy batch skips the sort `sample` needs for top-k / top-p (same tokens: its greedy rows are argmax)."""
    def one(lg, seed, step, temp, k, p):
        return sample(lg[None], jax.random.fold_in(jax.random.key(seed), step), temp, k, p)[0]

    return jax.lax.cond(jnp.any(temperature > 0),
                        lambda: jax.vmap(one)(logits, seeds, steps, temperature, top_k, top_p),
                        lambda: jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32))


def _step_and_sample(model_def, weights, cache, prev, rows, block_tables, knobs, probs):
    tokens, positions, valid, source = rows
    tokens = jnp.where(source >= 0, prev[jnp.maximum(source, 0)], tokens)  # decode inputs still on the device
    sample_idx, seeds, steps, top_k = knobs
    temperature, top_p = probs
    logits, cache = packed_forward(model_def.merge(weights), cache, tokens, positions, valid, block_tables,
                                   sample_idx)
    return sample_rows(logits, seeds, steps, temperature, top_k, top_p), cache


# (model_def, weights (`split_for_jit`), cache, prev [R] int32 (the previous call's output), rows [4, N] int32
#  (tokens, positions, valid, source: -1, or the index in prev of the row's token), block_tables [N, W] int32,
#  knobs [4, R] int32 (sample_idx, seeds, steps, top_k), probs [2, R] fp32 (temperature, top_p)) -> (next token
#  per sampled row [R], cache). Four host arrays a step (each transfer has a fixed cost); prev stays on the
#  device, so a decode step can be dispatched before the previous one's tokens are read back; the cache is donated.
step_and_sample = jax.jit(_step_and_sample, static_argnums=0, donate_argnums=2)
