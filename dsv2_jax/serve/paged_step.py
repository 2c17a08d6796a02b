"""One jitted forward over the paged latent cache: chunked prefill and decode are the same function.

A batch is B rows of up to T new tokens each: row b continues its sequence at position starts[b] with n_new[b]
tokens (decode: T = 1). Every layer of the ONE DeepseekV2 module writes the new tokens' c_KV / k_rope into their
pages (padding writes go to the trash page) and then attends with weight absorption over the row's pages:
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

from dsv2_jax.ops.attention_backend import current_platform, select
from dsv2_jax.model.transformer import DeepseekV2, scan_layers
from dsv2_jax.model.rope import rope_tables
from dsv2_jax.infer.sampling import sample
from dsv2_jax.serve.paged_cache import TRASH_PAGE, PagedLatentCache
from kernels_pallas.paged_mla_decode import gather_pages, paged_mla_decode


def _attend(attn, q_nope, q_rope, ckv_pool, krope_pool, layer, block_tables, positions, lengths):
    """Absorbed attention of the new tokens [B,T] over their rows' pages → [B,T,H,v]."""
    scale = attn.cfg.softmax_scale
    if q_nope.shape[1] == 1:
        q_lat = jnp.einsum("bhn,chn->bhc", q_nope[:, 0], attn.w_uk[...])
        o_lat, _ = paged_mla_decode(q_lat, q_rope[:, 0], ckv_pool, krope_pool, block_tables, lengths, scale=scale,
                                    layer=layer, backend=select(attn.cfg.attention_impl, current_platform(), "decode"))
        return jnp.einsum("bhc,chv->bhv", o_lat, attn.w_uv[...])[:, None]
    ckv = gather_pages(ckv_pool, block_tables, layer).astype(q_nope.dtype)
    krope = gather_pages(krope_pool, block_tables, layer).astype(q_nope.dtype)
    mask = jnp.arange(ckv.shape[1])[None, None, None, :] <= positions[:, None, :, None]  # [B,1,T,S]
    return attn.attend_absorbed(q_nope, q_rope, ckv, krope, mask)


def paged_forward(model: DeepseekV2, cache: PagedLatentCache, tokens, starts, n_new, block_tables):
    """tokens [B,T] int32, starts [B], n_new [B] (0..T; 0 = padding row), block_tables [B,N] page ids covering
    positions < starts + n_new → (logits [B,V] fp32 at each row's last new token, cache with the tokens written).
    """
    b, t = tokens.shape
    page = cache.page_size
    offs = jnp.arange(t, dtype=jnp.int32)
    positions = starts[:, None] + offs                                           # [B,T]
    valid = offs[None, :] < n_new[:, None]
    slot = jnp.clip(positions // page, 0, block_tables.shape[1] - 1)
    write_page = jnp.where(valid, jnp.take_along_axis(block_tables, slot, axis=1), TRASH_PAGE)
    write_off = positions % page
    lengths = starts + jnp.maximum(n_new, 1)  # decode attends to everything up to and including its token
    cos, sin = rope_tables(model.config, positions)

    def step(layer, carry, i):
        h, ckv_pool, krope_pool = carry
        attn = layer.attn
        x = layer.attn_norm(h)
        q_nope, q_rope = attn.queries(x, cos, sin)
        ckv, k_rope = attn.latents(x, cos, sin)
        ckv_pool = ckv_pool.at[i, write_page, write_off].set(ckv.astype(ckv_pool.dtype))
        krope_pool = krope_pool.at[i, write_page, write_off].set(k_rope.astype(krope_pool.dtype))
        o = _attend(attn, q_nope, q_rope, ckv_pool, krope_pool, i, block_tables, positions, lengths)
        h, _ = layer.feed_forward(h + attn.output(o), valid)
        return (h, ckv_pool, krope_pool), None

    h = model.embed_tokens(tokens)
    ckvs, kropes = [], []
    for (layers, _), ckv_g, krope_g in zip(model.layer_groups(), cache.ckv, cache.krope):
        (h, ckv, krope), _ = scan_layers(layers, (h, ckv_g, krope_g), step, xs=jnp.arange(ckv_g.shape[0]))
        ckvs.append(ckv)
        kropes.append(krope)
    last = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)  # [B,1,D]
    return model.logits(last)[:, 0], PagedLatentCache(tuple(ckvs), tuple(kropes))


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
