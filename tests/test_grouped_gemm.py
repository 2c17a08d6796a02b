"""The grouped-GEMM seam: every backend equals experts_reference (values and all gradients), costs O(active
rows), is what every MoE path calls, and the tokamax path runs its Pallas kernel (interpret mode on CPU) and
lowers to the Mosaic kernels for TPU and NVIDIA."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.ops import grouped_gemm as gg
from dsv2_jax.model import moe
from dsv2_jax.config import ModelConfig
from dsv2_jax.parallel.expert_parallel import ExpertParallel
from dsv2_jax.parallel.sharding import make_mesh
from dsv2_jax.ops.attention_backend import lowering_platform

E, D, F = 8, 16, 12
# Expert choice per (token, slot). "ragged": top-3 over 4 of the 8 experts (4 empty, one holding ~half the
# copies), N·K = 37·3 = 111 rows, not a multiple of any tile; "one_expert": top-1, every token on expert 5.
LAYOUTS = {
    "ragged": lambda rng, n, k: np.stack([rng.choice([0, 2, 3, 7], size=k, replace=False, p=[.55, .25, .15, .05])
                                          for _ in range(n)]),
    "one_expert": lambda rng, n, k: np.full((n, k), 5),
    "uniform": lambda rng, n, k: np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)]),
}


def make_problem(layout: str, dtype, n: int = 37, k: int = 3, d: int = D, f: int = F, e: int = E, seed: int = 0):
    rng = np.random.default_rng(seed)
    experts = jnp.asarray(LAYOUTS[layout](rng, n, k), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32)
    r = moe.Routing(jnp.zeros((n, e), jnp.float32), experts, weights)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = [jnp.asarray(0.3 * rng.normal(size=s), dtype) for s in ((e, d, f), (e, d, f), (e, f, d))]
    return x, r, w


def loss(fn, r, x, wg, wu, wd):
    # A nonlinear head so every output element carries a different cotangent.
    return jnp.sum(jnp.sin(fn(x, r, wg, wu, wd).astype(jnp.float32)))


def check_against_reference(fn, x, r, w, tol):
    want = moe.experts_reference(x, r, *w)
    got = fn(x, r, *w)
    assert got.dtype == x.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    grads = jax.jit(jax.grad(partial(loss, fn, r), argnums=(0, 1, 2, 3)))(x, *w)
    want_grads = jax.jit(jax.grad(partial(loss, moe.experts_reference, r), argnums=(0, 1, 2, 3)))(x, *w)
    for name, g, gw in zip(("x", "w_gate", "w_up", "w_down"), grads, want_grads):
        scale = float(np.abs(np.asarray(gw, np.float32)).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(gw, np.float32), atol=tol["atol"] * scale,
                                   rtol=tol["rtol"], err_msg=f"d/d{name}")


FP32 = dict(atol=2e-5, rtol=1e-5)
BF16 = dict(atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("impl,layout,k", [(impl, layout, k) for impl in ("cpu", "blocked", "gather")
                                           for layout, k in (("ragged", 3), ("one_expert", 1))]
                         + [("ragged_dot", "ragged", 3)])  # XLA's own op: one case suffices
def test_every_backend_equals_reference_fp32(impl, layout, k):
    x, r, w = make_problem(layout, jnp.float32, k=k)
    check_against_reference(jax.jit(partial(moe.experts_ragged, gemm=impl)), x, r, w, FP32)


@pytest.mark.parametrize("impl", ("cpu", "blocked", "gather"))
def test_bf16_within_bf16_tolerance(impl):
    x, r, w = make_problem("ragged", jnp.bfloat16)
    check_against_reference(jax.jit(partial(moe.experts_ragged, gemm=impl)), x, r, w, BF16)


@pytest.mark.parametrize("impl", ("cpu", "blocked", "gather"))
def test_ids_past_the_experts_give_zero_rows_and_no_gradient(impl):
    """The expert-parallel buffers mark empty slots with id = E: zeros out, nothing into any weight grad."""
    x, r, w = make_problem("uniform", jnp.float32, n=24, k=1)
    ids = r.experts[:, 0].at[::3].set(E)
    real = np.asarray(ids) < E
    f = jax.jit(lambda x, wg: gg.grouped_expert_mlp(x, ids, wg, *w[1:], impl=impl))
    y = f(x, w[0])
    assert np.all(np.asarray(y)[~real] == 0)
    only_real = moe.Routing(r.scores[real], ids[real][:, None], jnp.ones((int(real.sum()), 1)))
    np.testing.assert_allclose(y[real], moe.experts_reference(x[real], only_real, *w), atol=1e-5)
    gx, gw = jax.grad(lambda x, wg: jnp.sum(f(x, wg) ** 2), argnums=(0, 1))(x, w[0])
    assert np.all(np.asarray(gx)[~real] == 0)
    gw_real = jax.grad(lambda wg: jnp.sum(moe.experts_reference(x[real], only_real, wg, *w[1:]) ** 2))(w[0])
    np.testing.assert_allclose(gw, gw_real, atol=1e-4)


def largest_buffer(impl: str, m: int = 128, e: int = 64, d: int = 16, f: int = 8) -> int:
    """Elements of the largest f32 array in the compiled forward+backward."""
    x, ids = jnp.zeros((m, d)), jnp.zeros((m,), jnp.int32)
    w = [jnp.zeros(s) for s in ((e, d, f), (e, d, f), (e, f, d))]
    step = jax.jit(jax.grad(lambda x, *w: jnp.sum(gg.grouped_expert_mlp(x, ids, *w, impl=impl)), argnums=(0, 1, 2, 3)))
    hlo = step.lower(x, *w).compile().as_text()
    return max(int(np.prod([int(s) for s in dims.split(",") if s])) for dims in re.findall(r"f32\[([\d,]*)\]", hlo))


def test_cpu_and_blocked_forward_and_backward_never_expand_to_every_expert():
    """128 rows, 64 experts: the dense expansion is E·M·F = 65,536 elements; XLA's ragged_dot builds it on CPU,
    the kernel's and the blocked path's largest array is the weight stack itself (E·D·F = 8,192)."""
    dense = 64 * 128 * 8
    assert largest_buffer("ragged_dot") >= dense  # the failure mode this guards against
    assert largest_buffer("blocked") <= 64 * 16 * 8
    assert largest_buffer("cpu") <= 64 * 16 * 8


def test_blocked_backward_writes_bf16_weight_grads_without_fp32_stacks():
    """bf16 weights: the compiled backward's fp32 arrays are per-tile temporaries (one expert's [D, F] weight
    grad accumulators at most), none the size of a weight stack; empty experts get exact zero gradients."""
    e, d, f, m = 64, 32, 24, 64
    ids = jnp.asarray(np.arange(m) % 4 * 3, jnp.int32)  # experts 0, 3, 6, 9 only
    x = jnp.ones((m, d), jnp.bfloat16)
    w = [jnp.full(s, 0.01, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d))]
    step = jax.jit(jax.grad(lambda x, *w: jnp.sum(gg.grouped_expert_mlp(x, ids, *w, impl="blocked")
                                                   .astype(jnp.float32)), argnums=(1, 2, 3)))
    hlo = step.lower(x, *w).compile().as_text()
    f32 = [int(np.prod([int(s) for s in dims.split(",") if s])) for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
    assert max(f32) <= d * f
    for g in step(x, *w):
        assert g.dtype == jnp.bfloat16
        empty = np.setdiff1d(np.arange(e), [0, 3, 6, 9])
        assert np.all(np.asarray(g[empty], np.float32) == 0) and np.all(np.asarray(g[:1], np.float32) != 0)


def loop_body_copies(hlo: str) -> list[str]:
    """The copy / transpose instructions of any array (not scalars) inside the compiled while-loop bodies."""
    comps = {c.split(" ", 1)[0].lstrip("%"): c for c in hlo.split("\n\n") if c.startswith("%")}
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    return [line.strip() for name in bodies for line in comps[name].splitlines()
            if re.search(r"%\S*(copy|transpose)\S* = \w+\[\d[\d,]*\]", line)]  # op or fusion of one


def test_blocked_tile_loops_copy_no_array():
    """Per tile, the compiled forward and backward loops read one expert's [D, F] weight slices, fold every
    transpose (w_down[e].T, x_tile.T) into the dots' contracting dimensions, and update the carried output and
    weight-grad buffers in place: no copy or transpose of any array. (Running two tiles per loop step, for
    one, made XLA copy the three [E, D, F] grad stacks twice per step: 2.3x slower at E=64.)"""
    x, r, w = make_problem("uniform", jnp.float32, n=64, k=2)
    ids = r.experts.reshape(-1)
    step = jax.jit(jax.grad(lambda x, *w: jnp.sum(gg.grouped_expert_mlp(x, ids, *w, rows=jnp.arange(128) // 2,
                                                                         impl="blocked") ** 2), argnums=(0, 1, 2, 3)))
    hlo = step.lower(x, *w).compile().as_text()
    assert len(re.findall(r"body=%", hlo)) == 2  # the forward and the backward tile loops
    assert loop_body_copies(hlo) == []


def test_blocked_tile_follows_the_data():
    """The tile follows the mean group size (padding < one tile per active expert) against the loop's
    per-step cost, within 8..128 rows: wide experts (more work per row) get smaller tiles."""
    assert [gg.tile_rows(2048, e, 64, 32) for e in (4, 16, 64, 160)] == [128, 128, 32, 16]
    assert [gg.tile_rows(12288, e, 128, 88) for e in (4, 16, 64, 160)] == [128, 128, 64, 32]
    assert gg.tile_rows(64, 64, 16, 8) == 8


def test_gather_reads_only_the_selected_experts():
    """B=1 decode, top-4 of 64 experts: no array the compiled step produces is larger than the 4 selected
    experts' weights (the stacks are only indexed, inside the gather fusions)."""
    e, d, f, k = 64, 16, 8, 4
    ids, x = jnp.arange(k, dtype=jnp.int32) * 5, jnp.zeros((k, d))
    w = [jnp.zeros(s) for s in ((e, d, f), (e, d, f), (e, f, d))]
    hlo = jax.jit(partial(gg.grouped_expert_mlp, impl="auto")).lower(x, ids, *w).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    produced = [int(np.prod([int(s) for s in dims.split(",") if s])) for line in entry.splitlines()
                if "parameter(" not in line for dims in re.findall(r"= f32\[([\d,]*)\]", line)]
    assert max(produced) <= k * d * f < e * d * f


def test_auto_picks_per_platform_and_shape(monkeypatch):
    assert gg.select_impl("auto", m=6, e=160, d=64, f=32) == "gather"  # B=1, top-6: reads 6/160 of the experts
    assert gg.select_impl("auto", m=2048, e=160, d=64, f=32) == "cpu"
    assert gg.select_impl("tokamax", m=6, e=160, d=64, f=32) == "tokamax"
    with lowering_platform("tpu"):  # exporting for another platform never takes this host's kernel
        assert gg.select_impl("auto", m=2048, e=160, d=128, f=128) == "tokamax"
        assert gg.select_impl("auto", m=2048, e=160, d=64, f=32) == "blocked"
    monkeypatch.setattr(gg.grouped_gemm_cpu, "available", lambda: False)  # no C++ compiler on this host
    assert gg.select_impl("auto", m=2048, e=160, d=64, f=32) == "blocked"
    with pytest.raises(ValueError, match="grouped_gemm"):
        gg.select_impl("dense", 6, 160, 64, 32)


def test_config_field_reaches_the_seam(monkeypatch):
    """MoE passes config.grouped_gemm to the experts function; a bad value is a config error naming the field."""
    seen = []
    monkeypatch.setattr(gg, "sorted_swiglu", lambda *a: seen.append(a[-1]) or jnp.zeros_like(a[0]))
    cfg = ModelConfig.preset("tiny").replace(grouped_gemm="ragged_dot")
    layer = moe.MoE(cfg, jnp.float32)
    jax.eval_shape(layer, jnp.zeros((2, 16, cfg.hidden_size)))
    assert seen == ["ragged_dot"]
    with pytest.raises(ValueError, match="grouped_gemm"):
        cfg.replace(grouped_gemm="dense")


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
@pytest.mark.parametrize("ragged_a2a", [False, True])
def test_expert_parallel_local_experts_use_the_seam(monkeypatch, mode, ragged_a2a):
    """Both dispatch modes (and the ragged_all_to_all variant) hand their local experts to the same seam with
    the configured backend; their values are checked against single-device in test_expert_parallel.py."""
    seen = []
    real = gg.sorted_swiglu
    monkeypatch.setattr(gg, "sorted_swiglu", lambda *a: seen.append(a[-1]) or real(*a))
    x, r, w = make_problem("uniform", jnp.float32, n=32, k=2)
    fn = ExpertParallel(make_mesh("data=2,expert=4"), mode, ragged_all_to_all=ragged_a2a)
    jax.make_jaxpr(jax.grad(lambda x: jnp.sum(fn(x, r, *w, gemm="ragged_dot"))))(x)
    jax.make_jaxpr(lambda x: fn(x, r, *w))(x)
    assert seen == ["ragged_dot", "cpu"]


@pytest.mark.parametrize("impl", ["cpu", "blocked"])
def test_runs_in_a_shard_map_with_vma_checks(impl):
    """In a shard_map with the vma check on (a user's; the expert-parallel one runs without it), rows split over
    the devices and replicated weights: the results and all gradients equal the unsharded call."""
    from jax.sharding import PartitionSpec as P

    x, r, w = make_problem("uniform", jnp.float32, n=64, k=2)
    ids = r.experts.reshape(-1)
    rows = jnp.arange(128) // 2
    mesh = make_mesh("data=8")

    def sharded(x, *w):  # each device: its 8 tokens' 16 copies
        fn = jax.shard_map(lambda x, ids, *w: gg.grouped_expert_mlp(x, ids, *w, rows=jnp.arange(16) // 2, impl=impl),
                           mesh=mesh, in_specs=(P("data"), P("data"), P(), P(), P()), out_specs=P("data"))
        return fn(x, ids, *w)

    def whole(x, *w):
        return gg.grouped_expert_mlp(x, ids, *w, rows=rows, impl=impl)

    np.testing.assert_allclose(jax.jit(sharded)(x, *w), whole(x, *w), atol=1e-5)
    def loss(f, *a):
        return jnp.sum(jnp.sin(f(*a)))
    got = jax.jit(jax.grad(partial(loss, sharded), argnums=(0, 1, 2, 3)))(x, *w)
    want = jax.grad(partial(loss, whole), argnums=(0, 1, 2, 3))(x, *w)
    for g, gw in zip(got, want):
        np.testing.assert_allclose(g, gw, atol=1e-5, rtol=1e-5)


# ---- tokamax -------------------------------------------------------------------------------------------
def interpret_ragged_dot(lhs, rhs, group_sizes, **_):
    """tokamax's Mosaic TPU ragged_dot (megablox gmm / tgmm) in Pallas interpret mode, with a fixed tiling
    (its heuristics query the TPU generation) and its own kernels for the backward."""
    from tokamax._src.ops.ragged_dot import base
    from tokamax._src.ops.ragged_dot import pallas_mosaic_tpu as tpu

    dot = tpu.PallasMosaicTpuRaggedDot(interpret=True, bypass_device_check=True, vjp=base.vjp,
                                       config=tpu.Config(tile_m=128, tile_k=128, tile_n=128))
    dot = dot.replace(vjp=partial(base.vjp, dlhs_ragged_dot=dot, drhs_ragged_dot=dot))
    return dot(lhs, rhs, group_sizes=group_sizes)


def test_tokamax_kernel_in_interpret_mode_equals_reference(monkeypatch):
    monkeypatch.setattr(gg, "tokamax_ragged_dot", interpret_ragged_dot)
    x, r, w = make_problem("ragged", jnp.float32, n=40, k=2, d=128, f=128)
    check_against_reference(partial(moe.experts_ragged, gemm="tokamax"), x, r, w, dict(atol=1e-4, rtol=1e-4))


def test_tokamax_refusing_the_backward_falls_back_to_blocked(monkeypatch):
    """tokamax refuses some shapes/dtypes only in its backward kernels (traced when differentiated): the seam
    then runs "blocked" for the whole problem instead of raising, and still equals the reference. With 8-row
    tiles (one compile for two checks): the hot expert (~60 rows) spans 8 tiles, so its weight gradient
    accumulates across loop steps, with empty experts in between."""
    @jax.custom_vjp
    def forward_only(lhs, rhs, group_sizes):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)

    def refuse(*_):
        raise NotImplementedError("no backward kernel for this shape")
    forward_only.defvjp(lambda lhs, rhs, gs: (forward_only(lhs, rhs, gs), None), refuse)
    monkeypatch.setattr(gg, "tokamax_ragged_dot", lambda lhs, rhs, gs, **_: forward_only(lhs, rhs, gs))
    ran = []
    real = gg.blocked_swiglu
    monkeypatch.setattr(gg, "blocked_swiglu", lambda *a: ran.append(a[-1]) or real(*a))
    monkeypatch.setattr(gg, "tile_rows", lambda m, e, d, f: 8)
    x, r, w = make_problem("ragged", jnp.float32)
    check_against_reference(jax.jit(partial(moe.experts_ragged, gemm="tokamax")), x, r, w, FP32)
    assert ran and set(ran) == {8}


def export_tokamax(platform: str):
    import tokamax

    m, d, f, e = 256, 128, 128, 4
    x, ids = jax.ShapeDtypeStruct((m, d), jnp.bfloat16), jax.ShapeDtypeStruct((m,), jnp.int32)
    w = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d))]
    step = jax.jit(jax.grad(lambda x, ids, *w: jnp.sum(gg.grouped_expert_mlp(x, ids, *w, impl="tokamax")
                                                       .astype(jnp.float32)), argnums=(0, 2, 3, 4)))
    with tokamax.config.cross_compile(True):
        return jax.export.export(step, platforms=[platform])(x, ids, *w).mlir_module()


def test_tokamax_path_lowers_to_the_tpu_kernels_forward_and_backward():
    from jax._src.mesh import AbstractDevice, AbstractMesh  # the TPU to lower for (tiling heuristics read it)

    tpu = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                     platform="tpu"))
    with jax.sharding.use_abstract_mesh(tpu):
        mlir = export_tokamax("tpu")
    calls = re.findall(r"call @(gmm|tgmm)\w*", mlir)
    assert "tpu_custom_call" in mlir and not re.search(r"(stablehlo|chlo)\.ragged_dot", mlir)
    assert calls.count("gmm") >= 5 and calls.count("tgmm") == 3  # forward and dX: gmm; the 3 weight grads: tgmm


def test_tokamax_path_lowers_to_mosaic_gpu_kernels_for_hopper(monkeypatch):
    from tokamax._src import gpu_utils

    class H100:
        device_kind, platform, compute_capability = "NVIDIA H100 80GB HBM3", "gpu", "9.0"
    monkeypatch.setattr(gpu_utils, "_compute_capability", lambda device=None: 9.0)
    monkeypatch.setattr(jax.extend.backend, "get_default_device", lambda: H100())
    mlir = export_tokamax("cuda")
    assert not re.search(r"(stablehlo|chlo)\.ragged_dot", mlir)  # every GEMM, forward and backward, is a kernel
    assert len(re.findall(r"custom_call @mosaic_gpu", mlir)) >= 8
