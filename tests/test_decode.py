"""Latent-cache decoding: parity with transformers' generate and with teacher-forced forwards, sampling, EOS."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from dsv2_jax import generate, load_model
from dsv2_jax.infer.decode import prefill
from dsv2_jax.infer.engine import DecodeEngine, decode_and_sample, prefill_and_sample
from dsv2_jax.infer.latent_cache import DenseLayerCache, LatentCache
from kernels_pallas.reference import attention_mask
from dsv2_jax.model.transformer import init_model
from dsv2_jax.model.rope import rope_tables
from dsv2_jax.infer.sampling import sample

NEW = 48
# Different lengths; 23 + 48 runs well past the tiny configs' original_max_position_embeddings (32 / 16).
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 21)), [(7 * i + 3) % 150 for i in range(23)]]


def hf_greedy(torch_model, prompt, n):
    torch_model.generation_config.eos_token_id = None  # never stop early: compare all n tokens
    ids = torch.tensor([prompt])  # explicit mask: HF would otherwise treat token 0 (pad_token_id) as padding
    out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def case(hf_checkpoint):
    """(name, fp32 model, torch model, transformers' greedy tokens for PROMPTS) per tiny config."""
    name, path, torch_model = hf_checkpoint
    return name, load_model(path), torch_model, [hf_greedy(torch_model, p, NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(case):
    """fp32-cache engine: every test below decodes PROMPTS with NEW tokens, so all share one compilation."""
    return DecodeEngine(case[1], cache_dtype=jnp.float32)


def test_greedy_matches_transformers(case, engine):
    model, want = case[1], case[3]
    assert engine.generate(PROMPTS, NEW) == want
    cfg = model.config
    assert engine.cache_nbytes == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4 * 3 * 128
    assert engine.stats.new_tokens == 3 * NEW and engine.tokens_per_s > 0


def test_engines_over_equal_models_share_compiled_steps(hf_checkpoint, case, engine):
    """The jitted steps take an interned ModelDef (hashed by identity, not the GraphDef on every call): a second
    engine over the same checkpoint gets the same one and reuses the compiled prefill/decode, same tokens."""
    engine.generate(PROMPTS, NEW)
    compiled = prefill_and_sample._cache_size(), decode_and_sample._cache_size()
    other = DecodeEngine(load_model(hf_checkpoint[1]), cache_dtype=jnp.float32)
    assert other.model_def is engine.model_def and other.weights is not engine.weights
    assert other.generate(PROMPTS, NEW) == case[3]
    assert (prefill_and_sample._cache_size(), decode_and_sample._cache_size()) == compiled


def test_default_cache_is_bf16_and_sized_exactly(case):
    cfg = case[1].config
    cache = LatentCache.zeros(cfg, batch=2, max_len=64)
    assert cache.dtype == jnp.bfloat16
    assert cache.ckv[-1].shape == (cfg.num_moe_layers, 2, 64, cfg.kv_lora_rank)
    assert cache.nbytes == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2 * 2 * 64


def test_every_decode_step_matches_teacher_forced_forward(engine):
    """Prefill + absorbed decode logits == model(ids) logits at every position, rows of different lengths,
    positions up to ~2x (v2) / ~4x (lite) original_max_position_embeddings."""
    tokens, lengths, cache = engine.batch(PROMPTS, NEW)
    knobs = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.key(0)
    tok, logits, cache = prefill_and_sample(engine.model_def, engine.weights, cache, tokens, lengths, key, *knobs)
    got, seqs = [logits], [tok]
    for step in range(1, NEW):
        tok, logits, cache = decode_and_sample(engine.model_def, engine.weights, cache, tok, key, jnp.int32(step),
                                               *knobs)
        got.append(logits)
        seqs.append(tok)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + NEW - 1)
    got, new = np.stack(got, 1), np.stack(seqs, 1)  # [B, NEW, V], [B, NEW]
    full = np.zeros((len(PROMPTS), max(map(len, PROMPTS)) + NEW), np.int32)  # right-padded: causal ignores pad
    for i, p in enumerate(PROMPTS):
        full[i, :len(p) + NEW] = p + new[i].tolist()
    want = np.asarray(jax.jit(lambda w, ids: engine.model_def.merge(w)(ids))(engine.weights, jnp.asarray(full)))
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(got[i], want[i, len(p) - 1:len(p) - 1 + NEW], atol=1e-4, rtol=1e-4)


def test_dense_cache_continues_a_prompt_in_chunks(engine):
    """The same layer call with a non-empty dense cache and T > 1 new tokens (absorbed attention over the cached
    context, DenseLayerCache.view): prefill 9 tokens, then the other 14 as one chunk == the whole prompt's forward."""
    ids = jnp.asarray([PROMPTS[2]])  # 23 tokens

    @jax.jit
    def both(weights, ids):
        model = engine.model_def.merge(weights)
        _, cache = prefill(model, LatentCache.zeros(model.config, 1, 32, jnp.float32), ids[:, :9], jnp.array([9]))
        h, cache, _ = model.forward(ids[:, 9:], 9 + jnp.arange(14, dtype=jnp.int32)[None], cache=cache)
        return model.logits(h), model(ids)[:, 9:], cache

    got, want, cache = both(engine.weights, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not cache.fresh and int(cache.lengths[0]) == 9  # the caller advances lengths


def test_absorbed_decode_equals_expanded_attention(case):
    """One token through MLA with a dense layer cache (latent cache + weight absorption) == expanded causal attention, per-row cache lengths."""
    cfg = case[1].config
    graphdef, stacked = nnx.split(init_model(cfg, seed=3, std=0.15).moe_layers.attn)
    state = jax.tree.map(lambda x: x[0], stacked)  # layer 0 of the stack
    b, s = 3, 16
    lengths = jnp.array([0, 7, 15])  # tokens already cached; the decoded token sits at this position

    @jax.jit
    def both(state, x):
        attn = nnx.merge(graphdef, state)
        cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(s), (b, s)))
        ckv, krope = attn.latents(x, cos, sin)
        rows = jnp.arange(b)
        one = lambda a: a[rows, lengths][:, None]  # noqa: E731
        out, cache = attn(one(x), (one(cos), one(sin)), cache=DenseLayerCache(ckv[None], krope[None], jnp.int32(0),
                                                                              lengths[:, None]))
        q_nope, q_rope = attn.queries(x, cos, sin)
        mask = attention_mask(s)
        return (out[:, 0], attn(x, (cos, sin))[0][rows, lengths], cache.ckv, ckv,
                attn.attend_absorbed(q_nope, q_rope, ckv, krope, mask),
                attn.attend_expanded(q_nope, q_rope, ckv, krope, mask))

    dec, full, new_ckv, ckv, absorbed, expanded = both(state, jax.random.normal(jax.random.key(1),
                                                                               (b, s, cfg.hidden_size)))
    np.testing.assert_allclose(dec, full, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(new_ckv[0], ckv, atol=1e-6)  # rewriting a token's own latent changes nothing
    np.testing.assert_allclose(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_top_k1_is_greedy(case, engine):
    greedy = case[3]
    a = engine.generate(PROMPTS, NEW, temperature=1.0, seed=7)
    assert a == engine.generate(PROMPTS, NEW, temperature=1.0, seed=7)
    assert a != engine.generate(PROMPTS, NEW, temperature=1.0, seed=8)
    assert a != greedy
    assert engine.generate(PROMPTS, NEW, temperature=1.3, top_k=1, seed=3) == greedy
    assert engine.generate(PROMPTS, NEW, temperature=0.8, top_p=1e-6, seed=3) == greedy


def test_sample_top_k_and_top_p_restrict_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
    draw = jax.jit(lambda key, k, p: sample(logits, key, jnp.float32(1.0), k, p))
    keys = jax.random.split(jax.random.key(0), 4)
    support = lambda k, p: set(np.concatenate([np.asarray(draw(key, k, p)) for key in keys]))  # noqa: E731
    assert support(2, 1.0) == {0, 1}
    assert support(0, 0.85) == {0, 1, 2}  # 0.5 + 0.3 < 0.85
    assert support(0, 1.0) == {0, 1, 2, 3}
    assert support(3, 0.7) == {0, 1}


def test_eos_stops_only_that_sequence(case, engine):
    greedy = case[3]
    eos = next(t for t in greedy[0] if t not in greedy[1])
    out = engine.generate(PROMPTS, NEW, eos_id=eos)
    for got, want in zip(out, greedy):
        assert got == want[:want.index(eos) + 1 if eos in want else NEW]
    assert out[0][-1] == eos and len(out[1]) == NEW  # the others keep going


@pytest.mark.parametrize("prompts, index, message", [
    ([[1, 2], []], 1, "is empty"),
    ([[1, 2], [3, 160]], 1, "outside the vocabulary"),
    ([[1] * 1020, [1, 2]], 0, "exceeds the maximum length 1024"),
])
def test_bad_prompts_raise_naming_the_prompt(case, prompts, index, message):
    with pytest.raises(ValueError, match=f"prompt {index}.*{message}"):
        generate(case[1], prompts, 8)


def test_sharded_decode_gives_the_same_tokens(hf_v2):
    """Weights placed by sharding.LOGICAL_RULES on a tensor x expert mesh of 8 simulated CPU devices."""
    path, torch_model = hf_v2
    mesh = jax.make_mesh((4, 2), ("tensor", "expert"), axis_types=(AxisType.Auto, AxisType.Auto))
    model = load_model(path, mesh=mesh)
    assert model.moe_layers.mlp.w_up[...].sharding.spec == PartitionSpec(None, "expert", None, "tensor")
    assert model.moe_layers.attn.wo[...].sharding.spec == PartitionSpec(None, "tensor", None, None)
    out = DecodeEngine(model, cache_dtype=jnp.float32).generate(PROMPTS, 16)
    assert out == [hf_greedy(torch_model, p, 16) for p in PROMPTS]


def test_pallas_kernels_decode_the_same_tokens(hf_v2):
    """attention_impl=pallas: flash prefill + flash-decoding over the stacked cache (interpreted on CPU)."""
    path, torch_model = hf_v2
    pallas = load_model(path, attention_impl="pallas")
    got = DecodeEngine(pallas, cache_dtype=jnp.float32).generate(PROMPTS[:2], 8)
    assert got == [hf_greedy(torch_model, p, 8) for p in PROMPTS[:2]]
