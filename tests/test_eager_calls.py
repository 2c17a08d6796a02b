"""Eager model calls (notebooks, Colab) compile once per shape: model/eager.py."""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import LITE_STYLE
from dsv2_jax import init_model
from dsv2_jax.config import ModelConfig
from dsv2_jax.infer.latent_cache import LatentCache
from dsv2_jax.model import eager

IDS = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % LITE_STYLE["vocab_size"]


@pytest.fixture(scope="module")
def model():
    return init_model(ModelConfig.from_hf(LITE_STYLE), seed=3, std=0.15)


def traced(model, *args, method="__call__", **kwargs):
    """The method under jax.jit: the path the project's jitted steps take."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, a: getattr(nnx.merge(graphdef, st), method)(*a, **kwargs))(state, args)


def compiles(caplog, fn):
    """(fn's result, number of XLA compilations it ran)."""
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        out = jax.block_until_ready(fn())
    return out, sum(r.getMessage().startswith("Compiling") for r in caplog.records)


def test_second_eager_call_compiles_nothing(model, caplog):
    _, fresh = compiles(caplog, lambda: jax.jit(lambda x: x * 3)(IDS))
    assert fresh == 1  # the counter sees compilations
    model(IDS)
    start = time.perf_counter()
    _, second = compiles(caplog, lambda: model(IDS))
    elapsed = time.perf_counter() - start
    assert second == 0
    assert elapsed < 0.5, f"a compiled call took {elapsed:.2f} s"


def test_eager_call_equals_the_jitted_method(model):
    eager_logits = model(IDS)
    np.testing.assert_array_equal(np.asarray(eager_logits), np.asarray(traced(model, IDS)))
    assert eager_logits.dtype == jnp.float32 and eager_logits.shape == (*IDS.shape, LITE_STYLE["vocab_size"])


def test_eager_forward_with_a_cache_equals_the_uncached_path(model, monkeypatch):
    cache = LatentCache.zeros(model.config, IDS.shape[0], 16, jnp.float32)
    got = model.forward(IDS, cache=cache)
    assert isinstance(got[1], LatentCache)
    monkeypatch.setattr(eager, "is_eager", lambda: False)  # op by op, as before eager.py
    want = model.forward(IDS, cache=cache)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_eager_calls_use_the_current_weights(model):
    before = model(IDS)
    size = eager._jitted._cache_size()
    saved = nnx.state(nnx.clone(model))
    changed = init_model(model.config, seed=4, std=0.15)
    nnx.update(model, nnx.state(changed))
    try:
        after = model(IDS)
        np.testing.assert_array_equal(np.asarray(after), np.asarray(changed(IDS)))
        assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3
        assert eager._jitted._cache_size() == size  # new weights, same program
    finally:
        nnx.update(model, saved)
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(before))


def test_traced_calls_run_the_method_itself(model):
    """Under jax.jit / jax.grad the model traces as written: no nested jit, nothing added to eager.py's cache."""
    graphdef, state = nnx.split(model)
    size = eager._jitted._cache_size()

    def loss(st):
        return jnp.mean(nnx.merge(graphdef, st)(IDS) ** 2)

    for fn in (jax.jit(loss), jax.grad(loss)):
        jaxpr = str(jax.make_jaxpr(fn)(state))
        assert "scan" in jaxpr and "_jitted" not in jaxpr
    assert eager._jitted._cache_size() == size


def test_sharded_model_eager_calls(model, caplog):
    """Parameters on a mesh, MoE expert-parallel over it: same logits, compiled once."""
    from dsv2_jax.parallel.expert_parallel import use_mesh
    from dsv2_jax.parallel.sharding import make_mesh, tree_shardings

    mesh = make_mesh("tensor=2,expert=4")
    graphdef, state = nnx.split(model)
    sharded = use_mesh(nnx.merge(graphdef, jax.device_put(state, tree_shardings(state, mesh))), mesh)
    got = sharded(IDS)
    _, again = compiles(caplog, lambda: sharded(IDS))
    assert again == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(model(IDS)), rtol=1e-5, atol=1e-5)
