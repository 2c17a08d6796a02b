"""Expert-parallel dispatch in shard_map on 8 simulated CPU devices, against the single-device experts."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv2_jax import DecodeEngine, load_model
from dsv2_jax.config import ModelConfig
from dsv2_jax.infer.decode import decode_step, prefill
from dsv2_jax.model import moe
from dsv2_jax.model.transformer import abstract_model
from dsv2_jax.parallel.expert_parallel import ExpertParallel, check_expert_mesh, dispatch_for, use_mesh
from dsv2_jax.parallel.sharding import LOGICAL_RULES, batch_divisor, make_mesh

N, D, E, F = 64, 16, 8, 12
MESHES = ["data=2,expert=4", "fsdp=2,tensor=2,expert=2"]


@pytest.fixture(scope="module")
def problem():
    cfg = ModelConfig.preset("tiny")  # 8 experts top-2, group-limited over 4 groups
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = [jnp.asarray(0.3 * rng.normal(size=s), jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    r = moe.route(cfg, x, jnp.asarray(rng.normal(size=(D, E)), jnp.float32))
    return cfg, x, r, w


@pytest.mark.parametrize("spec", MESHES)
def test_dropless_matches_single_device_values_and_grads(problem, spec):
    cfg, x, r, (wg, wu, wd) = problem
    fn = ExpertParallel(make_mesh(spec), "dropless")
    np.testing.assert_allclose(jax.jit(fn)(x, r, wg, wu, wd), moe.experts_ragged(x, r, wg, wu, wd), atol=1e-5)

    def loss(f, x, wg, wd):
        return jnp.sum(f(x, r, wg, wu, wd) ** 2)
    got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(x, wg, wd)
    want = jax.grad(lambda *a: loss(moe.experts_ragged, *a), argnums=(0, 1, 2))(x, wg, wd)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-5)


def expected_capacity_output(x, r, w, mesh, capacity_factor, protected=()):
    """Numpy reference: each token shard sends at most `cap` copies to each expert shard, keeping the
    protected tokens' copies first, then the highest-affinity ones; dropped copies contribute nothing."""
    ep, shards = mesh.shape["expert"], batch_divisor(mesh)
    n_local, k = N // shards, r.experts.shape[1]
    cap = math.ceil(capacity_factor * n_local * k / ep)
    experts, scores = np.asarray(r.experts), np.asarray(r.scores)
    weights = np.array(r.weights)
    for s in range(shards):
        rows = range(s * n_local, (s + 1) * n_local)
        for dev in range(ep):
            copies = [(scores[t, experts[t, j]] + 2.0 * (t in protected), t, j) for t in rows for j in range(k)
                      if experts[t, j] // (E // ep) == dev]
            for _, t, j in sorted(copies, key=lambda c: -c[0])[cap:]:
                weights[t, j] = 0.0
    dropped = int((weights == 0).sum())
    return moe.experts_reference(x, r._replace(weights=jnp.asarray(weights)), *w), dropped


@pytest.mark.parametrize("spec", MESHES)
def test_capacity_mode_drops_exactly_the_lowest_affinity_copies(problem, spec):
    cfg, x, r, w = problem
    mesh = make_mesh(spec)
    want, dropped = expected_capacity_output(x, r, w, mesh, capacity_factor=1.0)
    assert dropped > 0  # the test must exercise dropping
    got = jax.jit(ExpertParallel(mesh, "capacity", capacity_factor=1.0))(x, r, *w)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Eval never drops.
    np.testing.assert_allclose(jax.jit(ExpertParallel(mesh, "capacity", train=False))(x, r, *w),
                               moe.experts_ragged(x, r, *w), atol=1e-5)


def test_capacity_mode_never_drops_the_protected_sequences(problem):
    """The paper keeps ~10% of sequences whole: with seq_len 2 and never_drop_every 4, every 4th 2-token sequence
    of each 8-token shard ranks first for the capacity (its 4 copies fit any one device's budget of 4); the rest
    still drop by affinity."""
    cfg, x, r, w = problem
    mesh = make_mesh("data=2,expert=4")
    n_local = N // batch_divisor(mesh)
    protected = sorted(t for t in range(N) if ((t % n_local) // 2) % 4 == 0)
    want, dropped = expected_capacity_output(x, r, w, mesh, 1.0, set(protected))
    assert dropped > 0
    fn = jax.jit(ExpertParallel(mesh, "capacity", capacity_factor=1.0, seq_len=2, never_drop_every=4))
    got = np.asarray(fn(x, r, *w))
    np.testing.assert_allclose(got, want, atol=1e-5)
    full = np.asarray(moe.experts_reference(x, r, *w))
    plain = np.asarray(jax.jit(ExpertParallel(mesh, "capacity", capacity_factor=1.0))(x, r, *w))
    assert np.abs(got[protected] - full[protected]).max() < 1e-5  # nothing of theirs was dropped...
    assert np.abs(plain[protected] - full[protected]).max() > 1e-3  # ...which plain capacity mode would drop


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """jax.lax.ragged_all_to_all's documented semantics from all_gather (which XLA:CPU runs): peer i's slice
    operand[input_offsets[me] : +send_sizes[me]] lands at output[output_offsets[me] : ...] on device me."""
    gather = partial(jax.lax.all_gather, axis_name=axis_name)
    ops, in_off, sizes, out_off = gather(operand), gather(input_offsets), gather(send_sizes), gather(output_offsets)
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])
    for i in range(ops.shape[0]):
        start, size = out_off[i, me], sizes[i, me]
        src = jnp.clip(rows - start + in_off[i, me], 0, operand.shape[0] - 1)
        inside = (rows >= start) & (rows < start + size)
        output = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), ops[i][src], output)
    return output


def test_ragged_all_to_all_path_offsets_are_right(problem, monkeypatch):
    """ragged_all_to_all does not run on XLA:CPU: the GPU/TPU path's offset bookkeeping is checked against an
    all_gather emulation of the op, and its real form must trace forward and backward."""
    cfg, x, r, w = problem
    fn = ExpertParallel(make_mesh("data=2,expert=4"), "dropless", ragged_all_to_all=True)
    assert "ragged_all_to_all" in str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(fn(x, r, *w))))(x))
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    np.testing.assert_allclose(jax.jit(fn)(x, r, *w), moe.experts_ragged(x, r, *w), atol=1e-5)


def test_device_limited_routing_needs_groups_aligned_to_expert_shards():
    cfg = ModelConfig.preset("tiny")  # n_group 4
    check_expert_mesh(cfg, make_mesh("expert=4"))
    with pytest.raises(ValueError, match="n_group"):
        check_expert_mesh(cfg, make_mesh("expert=8"))
    with pytest.raises(ValueError, match="moe dispatch mode"):
        ExpertParallel(make_mesh("expert=2"), "bogus")


def test_shard_map_specs_follow_the_rules_table(problem, monkeypatch):
    """The expert-MLP width is split (and its partial sums reduced) exactly where LOGICAL_RULES says: one edit to
    the table changes the dispatch, with the same values."""
    cfg, x, r, w = problem
    ep = ExpertParallel(make_mesh("fsdp=2,tensor=2,expert=2"), "dropless")
    fn = lambda *a: ep(*a)  # noqa: E731 - a fresh function per trace: the specs are read when tracing
    assert "P('expert', None, 'tensor')" in str(jax.make_jaxpr(fn)(x, r, *w))
    assert "psum" in str(jax.make_jaxpr(fn)(x, r, *w))
    monkeypatch.setitem(LOGICAL_RULES, "expert_mlp", None)
    fn = lambda *a: ep(*a)  # noqa: E731
    assert "P('expert', None, None)" in str(jax.make_jaxpr(fn)(x, r, *w))
    assert "psum" not in str(jax.make_jaxpr(fn)(x, r, *w))
    np.testing.assert_allclose(jax.jit(fn)(x, r, *w), moe.experts_ragged(x, r, *w), atol=1e-5)


def test_dispatch_is_chosen_from_config_and_mesh_in_one_place():
    cfg = ModelConfig.preset("tiny")
    assert dispatch_for(cfg) is moe.experts_ragged
    assert dispatch_for(cfg.replace(moe_impl="reference"), make_mesh("")) is moe.experts_reference
    chosen = dispatch_for(cfg, make_mesh("data=2,expert=4"), mode="capacity", train=True)
    assert chosen == ExpertParallel(make_mesh("data=2,expert=4"), "capacity", train=True)  # CPU: fixed all_to_all
    model = use_mesh(abstract_model(cfg), make_mesh("expert=2"))
    assert model.moe_layers.mlp.dispatch == ExpertParallel(make_mesh("expert=2"), "dropless", train=False)
    assert use_mesh(model, None).moe_layers.mlp.dispatch is moe.experts_ragged


def _decode_logits(model, cache, tokens) -> tuple[np.ndarray, str]:
    """One jitted decode step: (logits [B, V], the program's HLO text)."""
    graphdef, state = nnx.split(model)
    lowered = jax.jit(lambda s, c, t: decode_step(nnx.merge(graphdef, s), c, t)[0]).lower(state, cache, tokens)
    return np.asarray(lowered.compile()(state, cache, tokens)), lowered.as_text()


def test_sharded_decode_runs_the_expert_parallel_dispatch(hf_v2):
    """load_model(mesh=...) gives every MoE layer the training dispatch; a decode step over tensor=2 x expert=4
    (3 sequences: rows padded to the 4 batch shards) moves tokens with all_to_all and gives the single-device
    logits. (test_decode.py's sharded test runs prefill and generation this way end to end.)"""
    path, _ = hf_v2
    sharded, single = load_model(path, mesh=make_mesh("tensor=2,expert=4")), load_model(path)
    assert isinstance(sharded.moe_layers.mlp.dispatch, ExpertParallel)
    engine = DecodeEngine(single, cache_dtype=jnp.float32)
    tokens, lengths, cache = engine.batch([[5, 6, 7, 8, 9], list(range(10, 21)), [3, 4]], 2)
    logits, cache = jax.jit(prefill)(single, cache, tokens, lengths)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    got, text = _decode_logits(sharded, cache, nxt)
    assert "all_to_all" in text
    want, text = _decode_logits(single, cache, nxt)
    assert "all_to_all" not in text
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_tokamax_runs_inside_the_dispatch_and_matches_single_device(monkeypatch):
    """tokamax's Mosaic TPU ragged_dot (Pallas interpret mode, with a v5e's tiling tables standing in for this
    CPU) as the local experts' grouped GEMM inside the dispatch's shard_map: values and gradients equal
    single-device. Under shard_map's vma check its kernels could not run there."""
    from jax._src import tpu_info
    from dsv2_jax.ops import grouped_gemm as gg
    from tests.test_grouped_gemm import interpret_ragged_dot

    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1))
    monkeypatch.setattr(gg, "tokamax_ragged_dot", interpret_ragged_dot)
    ran = []
    real = gg._tokamax_mosaic
    monkeypatch.setattr(gg, "_tokamax_mosaic", lambda *a: ran.append(1) or real(*a))
    n, d, e, f = 512, 128, 8, 128  # the kernel's minimum: ≥ 128 rows and columns per device
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = [jnp.asarray(0.05 * rng.normal(size=s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    r = moe.route(ModelConfig.preset("tiny").replace(hidden_size=d), x, jnp.asarray(rng.normal(size=(d, e)),
                                                                                   jnp.float32))
    fn = partial(ExpertParallel(make_mesh("data=2,expert=4"), "dropless"), gemm="tokamax")
    np.testing.assert_allclose(jax.jit(fn)(x, r, *w), moe.experts_ragged(x, r, *w), atol=1e-4)

    def loss(f, x, wg, wd):
        return jnp.sum(f(x, r, wg, w[1], wd) ** 2)
    got = jax.jit(jax.grad(partial(loss, fn), argnums=(0, 1, 2)))(x, w[0], w[2])
    want = jax.grad(partial(loss, moe.experts_ragged), argnums=(0, 1, 2))(x, w[0], w[2])
    for g, wg in zip(got, want):
        np.testing.assert_allclose(g, wg, atol=2e-4, rtol=1e-4)
    assert len(ran) >= 6  # the kernel, not the blocked fallback, ran forward and backward
    getattr(tpu_info.get_tpu_info, "cache_clear", lambda: None)()
