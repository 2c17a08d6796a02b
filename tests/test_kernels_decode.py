"""mla_decode (Pallas interpret mode on CPU) against the pure-JAX reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import default_backend, mla_decode
from kernels_pallas.reference import mla_decode_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(b, h, c, r, t, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    n = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
    return n(ks[0], (b, h, c)), n(ks[1], (b, h, r)), n(ks[2], (b, t, c)), n(ks[3], (b, t, r))


def _check(out, ref, dtype):
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out[0], np.float32), np.asarray(ref[0], np.float32), atol=tol, rtol=tol)
    np.testing.assert_allclose(out[1], ref[1], atol=tol, rtol=tol)


# T=37 is not a multiple of block_t=16; lengths cover 1, ragged and full.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h", [1, 16])
def test_decode_matches_reference(h, dtype):
    t = 37
    q_lat, q_rope, ckv, krope = _inputs(3, h, 32, 8, t, dtype)
    lengths = jnp.array([1, 20, t], jnp.int32)
    ref = mla_decode_reference(q_lat, q_rope, ckv, krope, lengths, scale=0.15)
    out = mla_decode(q_lat, q_rope, ckv, krope, lengths, scale=0.15, block_t=16, num_splits=1, backend="interpret")
    assert out[0].dtype == dtype and out[1].dtype == jnp.float32
    _check(out, ref, dtype)


def test_decode_many_heads():
    q_lat, q_rope, ckv, krope = _inputs(2, 128, 16, 8, 24, jnp.float32, seed=1)
    lengths = jnp.array([24, 5], jnp.int32)
    ref = mla_decode_reference(q_lat, q_rope, ckv, krope, lengths, scale=0.2)
    out = mla_decode(q_lat, q_rope, ckv, krope, lengths, scale=0.2, block_t=8, num_splits=2, backend="interpret")
    _check(out, ref, jnp.float32)


def test_split_k_equals_single_pass():
    # 7 blocks over 3 splits: the last split is partly out of range, and for the
    # short sequences whole splits lie beyond the length (empty-split merge).
    # Garbage (nan/inf) past each length must not leak into the output.
    t = 50
    q_lat, q_rope, ckv, krope = _inputs(3, 4, 32, 8, t, jnp.float32, seed=2)
    lengths = jnp.array([3, 31, t], jnp.int32)
    ref = mla_decode_reference(q_lat, q_rope, ckv, krope, lengths, scale=0.1)
    stale = jnp.arange(t)[None, :, None] >= lengths[:, None, None]
    ckv, krope = jnp.where(stale, jnp.nan, ckv), jnp.where(stale, jnp.inf, krope)
    run = lambda s: mla_decode(
        q_lat, q_rope, ckv, krope, lengths, scale=0.1, block_t=8, num_splits=s, backend="interpret"
    )
    one, three = run(1), run(3)
    _check(three, one, jnp.float32)
    _check(three, ref, jnp.float32)


def test_backend_selection():
    assert default_backend() in ("mosaic_gpu", "mosaic_tpu", "xla")
    q_lat, q_rope, ckv, krope = _inputs(1, 2, 8, 4, 5, jnp.float32)
    with pytest.raises(ValueError):
        mla_decode(q_lat, q_rope, ckv, krope, jnp.array([5]), scale=1.0, backend="triton")


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_reads_one_layer_of_a_stacked_cache_in_place(backend):
    """With `layer`, the kernel takes the whole [L,B,T,C] stack (as decode's layer scan carries it)."""
    q_lat, q_rope, _, _ = _inputs(2, 4, 32, 8, 20, jnp.float32, seed=2)
    stack = [_inputs(2, 4, 32, 8, 20, jnp.float32, seed=10 + i)[2:] for i in range(3)]
    ckv, krope = jnp.stack([s[0] for s in stack]), jnp.stack([s[1] for s in stack])
    lengths = jnp.array([20, 9], jnp.int32)
    run = jax.jit(lambda i: mla_decode(q_lat, q_rope, ckv, krope, lengths, scale=0.2, layer=i, block_t=8,
                                       backend=backend))
    for i in range(3):
        _check(run(jnp.int32(i)), mla_decode_reference(q_lat, q_rope, *stack[i], lengths, scale=0.2), jnp.float32)
