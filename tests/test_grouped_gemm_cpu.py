"""The CPU grouped-GEMM kernel (dsv2_jax/ops/grouped_gemm_cpu.cc): every micro-kernel edge equals
jax.lax.ragged_dot forward and in both gradients, and the build is cached, atomic and optional."""

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.ops import grouped_gemm_cpu as cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler on this host")


# Widths that hit every path of the micro-kernels: 16-column panels, the 8-column panel, < 8 scalar columns;
# group sizes with every remainder mod 6 rows, empty groups, and rows left past the groups.
@pytest.mark.parametrize("k,n", [(16, 12), (40, 29), (7, 1), (24, 8)])
@pytest.mark.parametrize("sizes", [[0, 13, 1, 0, 6, 11, 2, 3], [50, 0, 0, 0, 0, 0, 0, 0], [0] * 8])
def test_ragged_dot_and_its_gradients_equal_xla(k, n, sizes):
    m, e = 53, len(sizes)  # Σ sizes ≤ 50 < m: the last rows are no group's and must come out zero
    rng = np.random.default_rng(k * n)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(e, k, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    head = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)  # a different cotangent for every element

    def loss(dot, lhs, rhs):
        y = dot(lhs, rhs, gs)
        y = jnp.where((jnp.arange(m) < jnp.sum(gs))[:, None], y, 0)  # XLA leaves rows past the groups undefined
        return jnp.sum(jnp.sin(y) * head), y

    (_, got), grads = jax.jit(jax.value_and_grad(lambda *a: loss(cpu.ragged_dot, *a), (0, 1), has_aux=True))(lhs, rhs)
    (_, want), want_grads = jax.jit(jax.value_and_grad(lambda *a: loss(jax.lax.ragged_dot, *a), (0, 1),
                                                       has_aux=True))(lhs, rhs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(cpu.ragged_dot(lhs, rhs, gs))[sum(sizes):] == 0)
    for name, g, w in zip(("lhs", "rhs"), grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    empty = np.asarray(sizes) == 0
    assert np.all(np.asarray(grads[1])[empty] == 0)


def test_bf16_in_bf16_out_through_fp32():
    lhs = jnp.ones((10, 8), jnp.bfloat16)
    rhs = jnp.full((2, 8, 16), 0.5, jnp.bfloat16)
    y = cpu.ragged_dot(lhs, rhs, jnp.asarray([4, 6], jnp.int32))
    assert y.dtype == jnp.bfloat16 and np.all(np.asarray(y, np.float32) == 4.0)
    g = jax.grad(lambda r: jnp.sum(cpu.ragged_dot(lhs, r, jnp.asarray([4, 6], jnp.int32)).astype(jnp.float32)))(rhs)
    assert g.dtype == jnp.bfloat16 and np.asarray(g, np.float32)[1].max() == 6.0


def test_build_is_cached_atomic_and_keyed(tmp_path, monkeypatch):
    """A fresh cache compiles once into a keyed name (no temporary left behind); a second build reuses it
    without running the compiler; a different compiler string is a different library."""
    monkeypatch.setenv("DSV2_JAX_CACHE", str(tmp_path))
    path = cpu.build("c++")
    assert path.parent == tmp_path and sorted(os.listdir(tmp_path)) == [path.name]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("recompiled a cached kernel"))
    assert cpu.build("c++") == path
    assert cpu.library_path("g++") != path


def test_without_a_compiler_the_seam_keeps_blocked(tmp_path, monkeypatch):
    """A failing compiler: available() is False with a warning naming the command, nothing is left in the
    cache, and the seam's "auto" and explicit "cpu" both run the blocked path."""
    from dsv2_jax.ops import grouped_gemm as gg

    monkeypatch.setenv("DSV2_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    cpu.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="kernel unavailable.*false"):
            assert not cpu.available()
        assert os.listdir(tmp_path) == []
        assert gg.select_impl("auto", 2048, 64, 64, 32) == "blocked"
        ran = []
        monkeypatch.setattr(gg, "blocked_swiglu", lambda *a: ran.append(1) or jnp.zeros_like(a[0]))
        jax.make_jaxpr(lambda x: gg.sorted_swiglu(x, jnp.ones((2,), jnp.int32), *[jnp.zeros((2, 4, 4))] * 3,
                                                   "cpu"))(jnp.zeros((2, 4)))
        assert ran == [1]
    finally:
        monkeypatch.undo()
        cpu.available.cache_clear()
    assert cpu.available()  # the real kernel registers again for the rest of the session


def test_shapes_are_checked_with_a_clear_error():
    with pytest.raises(ValueError, match=r"rhs \[E, K, N\].*rhs \(2, 8\)"):
        cpu.ragged_dot(jnp.ones((4, 8)), jnp.ones((2, 8)), jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="group_sizes"):
        cpu.ragged_dot(jnp.ones((4, 8)), jnp.ones((2, 8, 3)), jnp.ones((3,), jnp.int32))
