"""Compiled (non-interpret) kernels against the references; runs only on GPU/TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.ops.attention_backend import tokamax_attention
from kernels_pallas import default_backend, flash_mla_attention, mla_decode
from kernels_pallas.paged_mla_decode import paged_mla_decode, paged_mla_decode_reference
from kernels_pallas.reference import mla_attention_reference, mla_decode_reference

BACKEND = default_backend()
pytestmark = pytest.mark.skipif(BACKEND == "xla", reason="needs a GPU or TPU")


def _normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


# V2 (H=128) and V2-Lite (H=16) decode shapes; ragged lengths incl. 1 and full.
@pytest.mark.parametrize("h", [16, 128])
@pytest.mark.parametrize("num_splits", [1, None])
def test_decode_compiled(h, num_splits):
    b, t, c, r = 4, 1024, 512, 64
    ks = jax.random.split(jax.random.PRNGKey(h), 4)
    args = (
        _normal(ks[0], (b, h, c)),
        _normal(ks[1], (b, h, r)),
        _normal(ks[2], (b, t, c)),
        _normal(ks[3], (b, t, r)),
        jnp.array([1, 77, 640, t], jnp.int32),
    )
    scale = 192**-0.5
    o, lse = mla_decode(*args, scale=scale, num_splits=num_splits, backend=BACKEND)
    o_ref, lse_ref = mla_decode_reference(*args, scale=scale)
    _close(o, o_ref, 2e-2)
    _close(lse, lse_ref, 2e-2)


# The same shapes over a shuffled page pool (pages of one and two kernel blocks); table slots past a row's
# length point at a NaN page, so reading one (or letting it into the sum) fails the test.
@pytest.mark.parametrize("h", [16, 128])
@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("page", [64, 128])
def test_paged_decode_compiled(h, num_splits, page):
    b, t, c, r, layers = 4, 1024, 512, 64, 2
    n, lengths = t // page, np.array([1, 77, 640, t])
    pool = b * n + 1  # the last page is the NaN page
    ks = jax.random.split(jax.random.PRNGKey(h + page), 5)
    ckv, krope = _normal(ks[2], (layers, pool, page, c)), _normal(ks[3], (layers, pool, page, r))
    tables = np.array(jax.random.permutation(ks[4], b * n)).reshape(b, n)
    tables[np.arange(n)[None] >= -(-lengths[:, None] // page)] = pool - 1
    q = (_normal(ks[0], (b, h, c)), _normal(ks[1], (b, h, r)))
    rows = (jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32))
    scale = 192**-0.5
    o_ref, lse_ref = paged_mla_decode_reference(*q, ckv, krope, *rows, scale=scale, layer=1)  # NaN-free pool
    poison = lambda a: a.at[:, -1].set(jnp.nan)
    o, lse = paged_mla_decode(*q, poison(ckv), poison(krope), *rows, scale=scale, layer=1, num_splits=num_splits,
                              backend=BACKEND)
    assert np.isfinite(np.asarray(o, np.float32)).all()
    _close(o, o_ref, 2e-2)
    _close(lse, lse_ref, 2e-2)


def _flash(q, k, v, **kw):
    """The flash core attention_backend runs for training / prefill here: ours on TPU, tokamax's on GPU."""
    if BACKEND == "mosaic_gpu":
        return tokamax_attention(q, k, v, kw["segment_ids"], kw["scale"])
    return flash_mla_attention(q, k, v, backend=BACKEND, **kw)


@pytest.mark.parametrize("segments", [False, True])
def test_flash_compiled(segments):
    b, t, h = 2, 1000, 4  # T not a multiple of the block
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k = _normal(ks[0], (b, t, h, 192)), _normal(ks[1], (b, t, h, 192))
    v = _normal(ks[2], (b, t, h, 128))
    seg = (jnp.arange(t)[None] >= jnp.array([[300], [700]])).astype(jnp.int32)
    kw = dict(scale=192**-0.5, segment_ids=seg if segments else None)
    _close(_flash(q, k, v, **kw), mla_attention_reference(q, k, v, **kw), 2e-2)
    do = _normal(ks[3], (b, t, h, 128))
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * do)
    grads = jax.grad(loss(lambda q, k, v: _flash(q, k, v, **kw)), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss(lambda q, k, v: mla_attention_reference(q, k, v, **kw)), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 5e-2)
