"""flash_mla_attention (Pallas interpret mode on CPU): forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_mla_attention
from kernels_pallas.reference import mla_attention_reference

# Scaled-down MLA shapes: qk dim 24 (~192 = 128 nope + 64 rope), v dim 16 (~128).
B, H, DQK, DV = 2, 2, 24, 16


def _inputs(t, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    n = lambda k, d: jax.random.normal(k, (B, t, H, d), jnp.float32).astype(dtype)
    return n(ks[0], DQK), n(ks[1], DQK), n(ks[2], DV)


def _packed_segments(t):
    # Three packed documents of uneven lengths per row, different per batch row.
    pos = jnp.arange(t)
    return jnp.stack([(pos >= 7).astype(jnp.int32) + (pos >= 30), (pos >= 19).astype(jnp.int32) * 5])


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


# T=40 is not a multiple of block_q=16; block_k=8 differs from block_q.
@pytest.mark.parametrize("causal,segments", [(True, False), (True, True), (False, True)])
def test_forward_and_grads(causal, segments):
    t, scale = 40, DQK**-0.5
    q, k, v = _inputs(t, jnp.float32)
    kw = dict(scale=scale, causal=causal, segment_ids=_packed_segments(t) if segments else None)
    flash = lambda q, k, v: flash_mla_attention(q, k, v, block_q=16, block_k=8, backend="interpret", **kw)
    ref = lambda q, k, v: mla_attention_reference(q, k, v, **kw)
    _close(flash(q, k, v), ref(q, k, v), 1e-5)
    do = jax.random.normal(jax.random.PRNGKey(9), (B, t, H, DV))
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * do)
    grads = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 1e-5)


def test_bf16():
    t = 32
    q, k, v = _inputs(t, jnp.bfloat16, seed=1)
    kw = dict(scale=DQK**-0.5, segment_ids=_packed_segments(t))
    out = flash_mla_attention(q, k, v, block_q=16, backend="interpret", **kw)
    assert out.dtype == jnp.bfloat16 and out.shape == (B, t, H, DV)
    _close(out, mla_attention_reference(q, k, v, **kw), 2e-2)
    dq = jax.grad(
        lambda q: flash_mla_attention(q, k, v, block_q=16, backend="interpret", **kw).astype(jnp.float32).sum()
    )(q)
    dq_ref = jax.grad(lambda q: mla_attention_reference(q, k, v, **kw).astype(jnp.float32).sum())(q)
    _close(dq, dq_ref, 5e-2)


def test_xla_backend_is_reference():
    q, k, v = _inputs(8, jnp.float32)
    _close(flash_mla_attention(q, k, v, scale=0.5, backend="xla"), mla_attention_reference(q, k, v, scale=0.5), 0)
