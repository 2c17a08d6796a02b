"""Weight-only int8 (qwix QArray, per-channel scales): accuracy against bfloat16, loading paths, memory report."""

from __future__ import annotations

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from dsv2_jax import load_model
from dsv2_jax.cli import main
from dsv2_jax.config import ModelConfig
from dsv2_jax.train.data import make_dataset
from dsv2_jax.infer.quantize import greedy_agreement, memory_report, perplexity
from dsv2_jax.tokenizer import load_tokenizer
from dsv2_jax.train.config import TrainConfig
from finetune_fixtures import make_released


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("released_q")
    make_released(path, seed=1)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The main job's recipe (tiny preset, byte tokenizer, standard-library sources), shortened: exactly the
    notebooks' base run, so the session's compilation cache holds its train step."""
    from dsv2_jax.train.loop import train

    work = tmp_path_factory.mktemp("trained")
    tc = TrainConfig.load("configs/train-tiny.json").replace(steps=30, seq_len=64, warmup_steps=3,
                                                             checkpoint_every=30)
    train(tc, work, progress=False)
    return work


def test_int8_agrees_with_bf16_on_a_trained_model(trained):
    ref = load_model(trained, "bfloat16")
    q = load_model(trained, "bfloat16", quantize="int8")
    tok = load_tokenizer(None)
    # The finetune notebook scores this prompt and length too (same programs: the compilation cache holds them).
    agree = greedy_agreement(ref, q, [tok.bos_id] + tok.encode("import os\n\n\ndef main(argv):\n    "), 256)
    # Held out: this package's sources (the run trained on the standard library's).
    held = list(itertools.islice(iter(make_dataset(["dsv2_jax"], tok, 256, 4, num_epochs=1, shuffle=False)), 4))
    increase = perplexity(q, held) / perplexity(ref, held) - 1
    print(json.dumps({"agreement": agree, "ppl_increase": increase}))
    assert agree["tokens"] == 256 and agree["teacher_forced"] >= 0.95
    assert increase <= 0.02


def test_int8_loading_generate_and_info(released, capsys):
    q = load_model(released, quantize="int8")
    w = nnx.state(q)["moe_layers"]["mlp"]["w_gate"].get_value()
    assert isinstance(w, qwix.QArray) and w.qvalue.dtype == jnp.int8 and w.scale.shape == (1, 8, 1, 24)
    assert not isinstance(nnx.state(q)["embed"].get_value(), qwix.QArray)
    assert main(["generate", "--checkpoint", str(released), "--prompt", "Say hi.", "--quantize", "int8",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["new_ids"]) == 4
    assert main(["info", "deepseek-v2-lite", "--quantize", "int8"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["weight_gb"] < 17 and mem["cache_tokens_that_fit"] > 100_000  # V2-Lite int8 on a 24 GB GPU


def test_memory_report_counts():
    cfg = ModelConfig.preset("deepseek-v2-lite")
    bf16, int8 = memory_report(cfg), memory_report(cfg, "int8")
    assert bf16["weight_bytes"] == pytest.approx(2 * 15.7e9, rel=0.01)  # every parameter in bf16 (router fp32)
    assert 0.5 < int8["weight_bytes"] / bf16["weight_bytes"] < 0.53
    assert int8["cache_bytes_per_token"] == 27 * 576 * 2


def test_qlora_adapters_on_an_int8_base(released):
    """LoRA on the int8 base: B = 0 is the int8 model (to fusion rounding), and gradients reach the adapters through the scan."""
    import jax

    from dsv2_jax.train.lora import LoraConfig, adapter_shapes, init_adapters, with_adapters
    from dsv2_jax.checkpoint.orbax_io import flatten

    q = load_model(released, quantize="int8")
    graphdef, state = nnx.split(q)
    lc = LoraConfig(2, 4.0, ("attn", "shared"))
    adapters = init_adapters(adapter_shapes(q.config, lc), jax.random.key(0))
    tokens = jnp.asarray([[0, 5, 9, 7, 3, 11]], jnp.int32)

    def forward(ad):
        return nnx.merge(graphdef, with_adapters(state, ad, lc.scale))(tokens)

    base = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens))(state)
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(adapters)), np.asarray(base), atol=1e-5, rtol=0)
    grads = flatten(jax.jit(jax.grad(lambda ad: forward(ad).std()))(adapters))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert all(float(jnp.abs(g).max()) > 0 for p, g in grads.items() if p[-1] == "b")
