"""Paged MLA decode kernel (interpreted on CPU) against its gather reference: ragged lengths, shuffled pages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_mla_decode import gather_pages, paged_mla_decode
from kernels_pallas.reference import mla_decode_reference

H, C, R, PAGE, LAYERS, POOL = 4, 32, 8, 8, 2, 40


def _case(lengths, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    n = max(-(-max(lengths) // PAGE), 1)
    # Every row gets distinct pages in a shuffled order; unused table slots point at page 0 (never read).
    perm = rng.permutation(np.arange(1, POOL))
    tables = np.zeros((b, n), np.int32)
    used = 0
    for i, length in enumerate(lengths):
        k = -(-length // PAGE)
        tables[i, :k] = perm[used:used + k]
        used += k
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    return (f(b, H, C), f(b, H, R), f(LAYERS, POOL, PAGE, C), f(LAYERS, POOL, PAGE, R), jnp.asarray(tables),
            jnp.asarray(lengths, jnp.int32))


@pytest.mark.parametrize("lengths,splits,layer", [([1, 8, 9, 23, 40], 1, 1), ([5, 17, 33], 3, 0)])
def test_paged_kernel_matches_reference(lengths, splits, layer):
    q_lat, q_rope, ckv, krope, tables, lens = _case(lengths)
    want_o, want_lse = mla_decode_reference(q_lat, q_rope, gather_pages(ckv, tables, layer),
                                            gather_pages(krope, tables, layer), lens, scale=0.3)
    got_o, got_lse = paged_mla_decode(q_lat, q_rope, ckv, krope, tables, lens, scale=0.3, layer=layer,
                                      num_splits=splits, backend="interpret")
    np.testing.assert_allclose(got_o, want_o, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_lse, want_lse, rtol=2e-5, atol=2e-5)
    xla_o, _ = paged_mla_decode(q_lat, q_rope, ckv, krope, tables, lens, scale=0.3, layer=layer, backend="xla")
    np.testing.assert_allclose(xla_o, want_o, rtol=1e-6, atol=1e-6)


def test_gather_reference_equals_contiguous_cache():
    """The paged reference reads exactly the tokens a contiguous cache would hold."""
    q_lat, q_rope, ckv, krope, tables, lens = _case([13, 30], seed=1)
    rows = gather_pages(ckv, tables, 1)
    assert rows.shape == (2, tables.shape[1] * PAGE, C)
    np.testing.assert_array_equal(rows[1, 10], ckv[1, tables[1, 1], 2])


def test_paged_kernel_lowers_for_tpu():
    q_lat, q_rope, ckv, krope, tables, lens = _case([5, 17], dtype=jnp.bfloat16)
    fn = lambda *a: paged_mla_decode(*a, scale=0.3, layer=1, backend="mosaic_tpu")
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q_lat, q_rope, ckv, krope, tables, lens)
    assert "paged_mla_decode" in exported.mlir_module()


def test_hopper_paged_kernel_rejects_pools_it_cannot_read():
    """The Hopper variant takes bf16/fp16 pools of whole 64-row pages only (attention_backend routes others to xla)."""
    args = _case([5, 17], dtype=jnp.float32)
    with pytest.raises(ValueError, match="page size 8"):
        paged_mla_decode(*args, scale=0.3, layer=1, backend="mosaic_gpu")


def test_paged_chunk_forward_equals_packed_rows():
    """The paged cache's [B, T] chunk path (cache.view: gathered pages, causal mask) and the scheduler's packed
    [N, 1] rows write the same latents and give the same last-token logits."""
    from flax import nnx

    from conftest import V2_STYLE
    from dsv2_jax.config import ModelConfig
    from dsv2_jax.model.transformer import init_model
    from dsv2_jax.serve.paged_cache import PagedLatentCache
    from dsv2_jax.serve.paged_step import packed_forward

    graphdef, state = nnx.split(init_model(ModelConfig.from_hf(dict(V2_STYLE)), seed=0, std=0.15))
    pool = PagedLatentCache.zeros(nnx.merge(graphdef, state).config, num_pages=6, page_size=PAGE, dtype=jnp.float32)
    n = 19  # three pages, the last partly filled
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 150, n), jnp.int32)
    table = jnp.asarray([[4, 1, 3]], jnp.int32)

    @jax.jit
    def chunk(state, pool):
        model = nnx.merge(graphdef, state)
        h, batch, _ = model.forward(tokens[None], jnp.arange(n)[None], cache=pool.for_batch(table, jnp.asarray([n])))
        return model.logits(h[:, -1:])[:, 0], batch.pool

    @jax.jit
    def packed(state, pool):
        return packed_forward(nnx.merge(graphdef, state), pool, tokens, jnp.arange(n, dtype=jnp.int32),
                              jnp.ones(n, jnp.int32), jnp.repeat(table, n, axis=0), jnp.asarray([n - 1]))

    (want, want_pool), (got, got_pool) = chunk(state, pool), packed(state, pool)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for a, b in zip(got_pool.ckv + got_pool.krope, want_pool.ckv + want_pool.krope):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
