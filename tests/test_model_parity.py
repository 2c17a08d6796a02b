"""The model against transformers' DeepseekV2ForCausalLM on tiny random checkpoints."""

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dsv2_jax
from dsv2_jax.config import ModelConfig
from dsv2_jax.ops.attention_backend import current_platform, select
from kernels_pallas.reference import attention_mask
from dsv2_jax.model.transformer import init_model
from tests.conftest import V2_STYLE, make_hf_checkpoint

SEQ = 80  # longer than both tiny configs' original_max_position_embeddings (32, 16): YaRN ramp matters


def token_batch(vocab, batch=2, length=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_logits(torch_model, ids):
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    name, path, torch_model = hf_checkpoint
    ids = token_batch(torch_model.config.vocab_size)
    return name, path, ids, hf_logits(torch_model, ids)


def test_fp32_logits_match_transformers(loaded):
    name, path, ids, ref = loaded
    for impl in ("ragged", "reference"):
        model = dsv2_jax.load_model(path, moe_impl=impl)
        out = np.asarray(model(jnp.asarray(ids, jnp.int32)))
        assert out.dtype == np.float32 and out.shape == ref.shape
        diff = np.abs(out - ref).max()
        print(f"{name} {impl}: max |logit diff| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
        assert diff <= 1e-4


def test_bf16_logits_within_bf16_tolerance(loaded, hf_checkpoint):
    """bf16 drifts from fp32 (routing flips amplify it); ours must drift no more than transformers' own bf16."""
    name, path, ids, ref = loaded
    out = np.asarray(dsv2_jax.load_model(path, dtype="bfloat16")(jnp.asarray(ids, jnp.int32)))
    assert out.dtype == np.float32
    hf_bf16 = hf_logits(copy.deepcopy(hf_checkpoint[2]).to(torch.bfloat16), ids)
    scale = np.abs(ref).max()
    ours, theirs = np.abs(out - ref).max() / scale, np.abs(hf_bf16 - ref).max() / scale
    print(f"{name} bf16: max |diff| / max |logit|: ours {ours:.3f}, transformers bf16 {theirs:.3f}")
    assert ours <= 1.25 * theirs + 0.01
    assert np.abs(out - ref).mean() / scale < 0.01
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_sharded_checkpoint_loads_identically(tmp_path, hf_v2):
    path, torch_model = hf_v2
    sharded = tmp_path / "sharded"
    make_hf_checkpoint(sharded, V2_STYLE, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    ids = token_batch(V2_STYLE["vocab_size"], batch=1, length=40, seed=1)
    out = np.asarray(dsv2_jax.load_model(sharded)(jnp.asarray(ids, jnp.int32)))
    assert np.abs(out - hf_logits(torch_model, ids)).max() <= 1e-4


def test_packed_segments_equal_separate_sequences():
    """Two documents packed in one row (segment ids, restarted positions) == each run alone."""
    cfg = ModelConfig.preset("tiny")
    model = init_model(cfg, seed=1)
    a, b = token_batch(cfg.vocab_size, 1, 13, seed=2), token_batch(cfg.vocab_size, 1, 19, seed=3)
    packed = jnp.asarray(np.concatenate([a, b], axis=1), jnp.int32)
    segments = jnp.asarray([[1] * 13 + [2] * 19], jnp.int32)
    positions = jnp.asarray([list(range(13)) + list(range(19))], jnp.int32)
    out = np.asarray(model(packed, positions, segments))
    alone = [np.asarray(model(jnp.asarray(x, jnp.int32))) for x in (a, b)]
    assert np.abs(out[:, :13] - alone[0]).max() < 1e-5
    assert np.abs(out[:, 13:] - alone[1]).max() < 1e-5
    mask = attention_mask(32, segments)
    assert not bool(mask[0, 0, 13, 12]) and bool(mask[0, 0, 14, 13])


def compile_seconds(layers: int) -> float:
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=layers)
    graphdef, state = nnx.split(init_model(cfg))
    ids = jnp.zeros((1, 16), jnp.int32)
    start = time.perf_counter()
    jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).compile()
    return time.perf_counter() - start


@pytest.mark.no_compile_cache
def test_compile_time_does_not_grow_with_depth():
    """4x the layers compiles in about the same time: the stacked groups are scanned, not unrolled.

    4 and 16 layers both give scans of length > 1 (a length-1 scan is inlined by XLA, which makes 2 layers an
    unfairly cheap baseline); unrolled, 16 layers would compile ~4x slower."""
    compile_seconds(4)  # warm up jax's own one-time costs
    runs = [(compile_seconds(4), compile_seconds(16)) for _ in range(2)]  # min of 2: robust to a busy machine
    shallow, deep = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"compile: 4 layers {shallow:.2f}s, 16 layers {deep:.2f}s, ratio {deep / shallow:.2f}")
    assert deep < 1.5 * shallow


def test_pallas_attention_matches_xla(hf_v2):
    """attention_impl=pallas (the flash kernel, interpreted on CPU) gives the XLA path's logits."""
    path, _ = hf_v2
    ids = jnp.asarray(token_batch(V2_STYLE["vocab_size"], batch=1, length=70, seed=4), jnp.int32)
    xla = np.asarray(dsv2_jax.load_model(path, attention_impl="xla")(ids))
    model = dsv2_jax.load_model(path, attention_impl="pallas")
    assert select(model.config.attention_impl, current_platform(), "train") == "interpret"
    pallas = np.asarray(model(ids))
    assert np.abs(pallas - xla).max() <= 1e-4
