"""Cross-lowering on this CPU host for TPU and CUDA (jax.export): the sharded train step, prefill, the decode step
and each attention kernel lower with the intended kernel custom calls, not the XLA fallback.

The target device is named by an AbstractMesh's abstract_device (what Pallas TPU lowering and
attention_backend.current_platform read); `lowering_platform` also lets tokamax build its kernels here.
V2-Lite shapes (16 heads, 192 / 128 head dims, 512 + 64 latent, 64 experts, top-6) with 2 layers and a small
vocabulary: export only traces and lowers, so full-width layers cost no more than tiny ones.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from dsv2_jax.ops.attention_backend import lowering_platform, paged_decode_attention, select, sequence_attention
from dsv2_jax.config import ModelConfig
from dsv2_jax.infer.decode import decode_step, prefill
from dsv2_jax.infer.latent_cache import LatentCache
from dsv2_jax.model.transformer import abstract_model
from dsv2_jax.parallel.sharding import MESH_AXES, parse_mesh, tree_shardings
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.state import BATCH_KEYS, Trainer
from kernels_pallas import default_backend, mla_decode

pytest.importorskip("tokamax")

CFG = ModelConfig.preset("deepseek-v2-lite").replace(num_hidden_layers=2, vocab_size=1024)
SEQ, BATCH, MAX_LEN = 256, 8, 512
DEVICES = {"tpu": AbstractDevice("TPU v5p", 1, "tpu"), "cuda": AbstractDevice("NVIDIA H100 80GB HBM3", None, "cuda")}
KERNEL_CALLS = {"tpu": ("tpu_custom_call",), "cuda": ("mosaic_gpu", "mosaic_gpu_v2")}
# Targets without a serialization-compatibility promise: fine for lowering checks (nothing is stored).
UNSTABLE = ("ragged_all_to_all", "mosaic_gpu", "mosaic_gpu_v2", "tpu_custom_call")
PLATFORMS = ["tpu", "cuda"]


@pytest.fixture(scope="module", autouse=True)
def hopper_for_tokamax():
    """tokamax picks its kernel generation from the default device's compute capability (none on CPU):
    present an sm90 while tracing, as the export target is an H100."""
    from tokamax._src import gpu_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_utils, "_compute_capability", lambda device=None: 9.0)
        yield


def target_mesh(platform: str, spec: str = "") -> AbstractMesh:
    sizes = parse_mesh(spec)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                        abstract_device=DEVICES[platform])


def lower(fn, args, platform: str, mesh: AbstractMesh | None = None) -> str:
    """StableHLO text of jax.export(fn) for `platform`, traced under the target mesh."""
    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    with lowering_platform(platform), jax.sharding.use_abstract_mesh(mesh or target_mesh(platform)):
        exported = export.export(fn, platforms=[platform],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in UNSTABLE])(*args)
    return exported.mlir_module()


def custom_calls(text: str) -> Counter:
    return Counter(a or b for a, b in re.findall(r'custom_call @(\w+)|call_target_name = "([^"]+)"', text))


def check_module(text: str, platform: str, min_kernels: int = 1) -> Counter:
    """The platform's kernel custom calls are there, no host callback is, and no [T,T] score matrix (the mark
    of XLA attention) exists anywhere in the module."""
    calls = custom_calls(text)
    assert sum(calls[t] for t in KERNEL_CALLS[platform]) >= min_kernels, calls
    assert not [t for t in calls if "callback" in t or "host" in t.lower()], calls
    assert not re.search(rf"tensor<(\d+x)*{SEQ}x{SEQ}xf32>", text), "XLA attention scores in the module"
    return calls


def sds(shape, dtype=jnp.bfloat16, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


# ---- kernels -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_kernel(platform):
    """Flash-decoding over one layer of a stacked bf16 latent cache (Mosaic TPU / Mosaic GPU Hopper kernel)."""
    h, c, r = CFG.num_attention_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim
    fn = lambda q, qr, ckv, kr, n, i: mla_decode(q, qr, ckv, kr, n, scale=0.1, layer=i,
                                                 backend=default_backend(platform))[0]
    args = (sds((BATCH, h, c)), sds((BATCH, h, r)), sds((2, BATCH, MAX_LEN, c)), sds((2, BATCH, MAX_LEN, r)),
            sds((BATCH,), jnp.int32), sds((), jnp.int32))
    check_module(lower(fn, args, platform), platform)


@pytest.mark.parametrize("platform,page,dtype,kernel", [
    ("tpu", 64, jnp.bfloat16, True), ("cuda", 64, jnp.bfloat16, True), ("cuda", 128, jnp.bfloat16, True),
    ("cuda", 16, jnp.bfloat16, False), ("cuda", 64, jnp.float32, False),
])
def test_paged_decode_kernel(platform, page, dtype, kernel):
    """Paged decode through attention_backend's dispatch: the platform's kernel reads one layer of the page pool
    through the block table (Hopper: pages of whole 64-row blocks in bf16); other pools take the gather path."""
    h, c, r, n = CFG.num_attention_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim, MAX_LEN // page
    fn = lambda q, qr, ckv, kr, bt, lens, i: paged_decode_attention("auto", q, qr, ckv, kr, bt, lens, scale=0.1,
                                                                    layer=i)
    args = (sds((BATCH, h, c), dtype), sds((BATCH, h, r), dtype), sds((2, BATCH * n, page, c), dtype),
            sds((2, BATCH * n, page, r), dtype), sds((BATCH, n), jnp.int32), sds((BATCH,), jnp.int32),
            sds((), jnp.int32))
    text = lower(fn, args, platform)
    gathered = re.search(rf"tensor<{BATCH}x{MAX_LEN}x{c}x", text)  # the rows' pages copied out as [B, N·page, C]
    if kernel:
        check_module(text, platform)
        assert not gathered  # the kernel reads the pool in place
    else:
        assert gathered and not any(custom_calls(text)[t] for t in KERNEL_CALLS[platform])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_flash_attention_forward_and_backward(platform):
    """Training attention through attention_backend: Pallas flash (TPU) / tokamax Mosaic GPU (CUDA), fwd + bwd."""
    assert select("auto", {"tpu": "tpu", "cuda": "gpu"}[platform], "train") == {"tpu": "mosaic_tpu",
                                                                                   "cuda": "tokamax_gpu"}[platform]
    h, n, r, v = CFG.num_attention_heads, CFG.qk_nope_head_dim, CFG.qk_rope_head_dim, CFG.v_head_dim

    def loss(q_nope, q_rope, k_nope, k_rope, vv, seg):
        o = sequence_attention("auto", "train", q_nope, q_rope, k_nope, k_rope, vv, seg, 0.1)
        return o.astype(jnp.float32).sum()

    args = (sds((2, SEQ, h, n)), sds((2, SEQ, h, r)), sds((2, SEQ, h, n)), sds((2, SEQ, r)), sds((2, SEQ, h, v)),
            sds((2, SEQ), jnp.int32))
    # fwd + the backward kernels (TPU: dk/dv and dq; tokamax: one fused backward).
    check_module(lower(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), args, platform), platform, min_kernels=2)


# ---- steps ---------------------------------------------------------------------------------------------------
# Both meshes and both dispatch modes on TPU; CUDA's own parts (tokamax in shard_map, ragged_all_to_all) once.
@pytest.mark.parametrize("platform,mesh_spec,dispatch", [
    ("tpu", "data=2,expert=4", "dropless"),
    ("tpu", "fsdp=2,tensor=2,expert=2", "capacity"),
    ("cuda", "fsdp=2,tensor=2,expert=2", "dropless"),
])
def test_sharded_train_step(platform, mesh_spec, dispatch):
    """Forward, backward and AdamW over 8 devices with expert-parallel dispatch; dropless moves tokens with
    ragged_all_to_all, capacity with fixed-size all_to_all; attention kernels run per shard (no gathers)."""
    mesh = target_mesh(platform, mesh_spec)
    tc = TrainConfig(model="deepseek-v2-lite", seq_len=SEQ, global_batch=BATCH, mesh=mesh_spec,
                     moe_dispatch=dispatch)
    trainer = Trainer(tc, mesh, CFG)  # the mesh names the target device: dropless picks ragged_all_to_all
    state = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), trainer.abstract_state, trainer.state_shardings)
    batch = {k: sds((BATCH, SEQ), jnp.int32, trainer.batch_sharding) for k in BATCH_KEYS}
    text = lower(trainer.step, (state, batch), platform, mesh)
    calls = check_module(text, platform, min_kernels=2)
    collectives = Counter(re.findall(r"stablehlo\.(all_to_all|all_gather)", text))
    if dispatch == "dropless":
        assert calls["ragged_all_to_all"] >= 3, calls  # tokens, expert ids out; results back
    else:
        assert calls["ragged_all_to_all"] == 0 and collectives["all_to_all"] >= 3, (calls, collectives)


def _model_args(mesh: AbstractMesh, batch: int):
    graphdef, state = nnx.split(abstract_model(CFG, jnp.bfloat16))
    state = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), state, tree_shardings(state, mesh))
    cache = jax.eval_shape(lambda: LatentCache.zeros(CFG, batch, MAX_LEN, jnp.bfloat16))
    return graphdef, state, cache


@pytest.mark.parametrize("platform", PLATFORMS)
def test_prefill_and_decode_step(platform):
    """Prefill (flash kernel, no backward) and one decode step over the bf16 latent cache (decode kernel), with
    weights sharded over a serving mesh (heads over tensor, experts over expert)."""
    mesh = target_mesh(platform, "tensor=2,expert=4")
    graphdef, state, cache = _model_args(mesh, BATCH)
    run_prefill = lambda s, c, t, n: prefill(nnx.merge(graphdef, s), c, t, n)
    text = lower(run_prefill, (state, cache, sds((BATCH, SEQ), jnp.int32), sds((BATCH,), jnp.int32)), platform,
                 mesh)
    check_module(text, platform)
    run_decode = lambda s, c, t: decode_step(nnx.merge(graphdef, s), c, t)
    text = lower(run_decode, (state, cache, sds((BATCH,), jnp.int32)), platform, mesh)
    check_module(text, platform)
    # The kernel runs per shard: nothing gathers the [L, B, S, 512] cache.
    assert not re.search(rf"all_gather.*tensor<\d+x{BATCH}x{MAX_LEN}x{CFG.kv_lora_rank}xbf16>", text)


# ---- the dispatch itself (runs here) -------------------------------------------------------------------------
def test_dispatch_table():
    assert [select("auto", p, "train") for p in ("cpu", "gpu", "tpu")] == ["xla", "tokamax_gpu", "mosaic_tpu"]
    assert [select("auto", p, "decode") for p in ("cpu", "gpu", "tpu")] == ["xla", "mosaic_gpu", "mosaic_tpu"]
    assert select("pallas", "cpu", "prefill") == "interpret" and select("xla", "tpu", "decode") == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        select("flash", "cpu", "train")


def test_tokamax_wrapper_matches_reference_with_packed_segments():
    """The segment ids -> per-query key ranges translation, run through tokamax's XLA implementation here."""
    from dsv2_jax.ops.attention_backend import tokamax_attention
    from kernels_pallas.reference import mla_attention_reference

    ks = jax.random.split(jax.random.key(0), 3)
    q, k = (jax.random.normal(kk, (2, 40, 2, 24)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (2, 40, 2, 16))
    pos = jnp.arange(40)
    seg = jnp.stack([(pos >= 7).astype(jnp.int32) + (pos >= 30), (pos >= 19).astype(jnp.int32) * 5])
    ours = lambda q, k, v: tokamax_attention(q, k, v, seg, 0.2, implementation="xla")
    ref = lambda q, k, v: mla_attention_reference(q, k, v, scale=0.2, segment_ids=seg)
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
    for g, g_ref in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)
