"""Fine-tuning released checkpoints: --init-from, SFT data with answer-only loss, LoRA (train, merge, export)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv2_jax import load_model
from dsv2_jax.cli import main
from dsv2_jax.config import ConfigError, ModelConfig
from dsv2_jax.train.init_from import initial_state, make_trainer
from dsv2_jax.train.losses import cross_entropy
from dsv2_jax.checkpoint.orbax_io import flatten, unflatten
from dsv2_jax.train.sft_data import load_examples, make_sft_dataset
from dsv2_jax.parallel.sharding import make_mesh
from dsv2_jax.tokenizer import load_tokenizer
from dsv2_jax.train.config import TrainConfig
from finetune_fixtures import make_released, write_sft

TOKENS = np.asarray(np.random.default_rng(0).integers(4, 100, (2, 12)), np.int32)


def logits(model, tokens=TOKENS) -> np.ndarray:
    """float32 [B, T, V] (eager calls compile once per shape: model/eager.py)."""
    return np.asarray(model(jnp.asarray(tokens)))


@pytest.fixture(scope="session")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("released")
    make_released(path)
    return path


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    write_sft(path)
    return path


def _train_args(released, workdir, sft_file, steps, *extra):
    return ["train", "--init-from", str(released), "--workdir", str(workdir), "--steps", str(steps),
            "--data", str(sft_file), "--no-progress", "--set", "seq_len=48", "--set", "global_batch=2",
            "--set", "compute_dtype=float32", "--set", "checkpoint_every=2", "--set", "warmup_steps=0", *extra]


# ---- --init-from ---------------------------------------------------------------------------------------------

def test_init_from_gives_the_loaded_models_logits(released):
    tc = TrainConfig(init_from=str(released), compute_dtype="float32", seq_len=16, global_batch=2)
    trainer = make_trainer(tc, make_mesh(""), tc.model_config())
    state = initial_state(trainer, released)
    assert int(state["step"]) == 0
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 1)
    np.testing.assert_array_equal(logits(trainer.model_for(state["params"])), logits(load_model(released)))


def test_init_from_config_checks(released, tmp_path):
    # An HF config.json is a model config wherever one is accepted.
    assert TrainConfig.load(str(released / "config.json")).model_config() == ModelConfig.from_hf(released)
    assert TrainConfig(init_from=str(released)).model_config() == ModelConfig.from_hf(released)
    tc = TrainConfig(init_from=str(released), model_overrides={"kv_lora_rank": 16})
    with pytest.raises(ConfigError, match=r"parameter 'dense_layers.attn.kv_norm.scale' has shape \[1, 24\] in the "
                                          r"checkpoint, the model config implies \[1, 16\]$"):
        make_trainer(tc, make_mesh(""), tc.model_config())
    assert main(["train", "--init-from", str(released), "--workdir", str(tmp_path / "w"),
                 "--set", "model.kv_lora_rank=16"]) == 2
    assert not (tmp_path / "w").exists()  # nothing written


def test_init_from_train_then_resume_wins(released, sft_file, tmp_path, capsys):
    work = tmp_path / "run"
    assert main(_train_args(released, work, sft_file, 2)) == 0
    assert "resuming" not in capsys.readouterr().err
    assert main(_train_args(released, work, sft_file, 2)) == 0  # already at step 2: restored, nothing to do
    out = capsys.readouterr()
    assert f"resuming {work} from step 2; init_from" in out.err and '"start_step": 2' in out.out
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ---- SFT data ---------------------------------------------------------------------------------------------------

def test_sft_weights_cover_answers_only(released, tmp_path):
    tok = load_tokenizer(released)
    chat, comp = tmp_path / "chat.jsonl", tmp_path / "comp.jsonl"
    write_sft(chat, 2)
    write_sft(comp, 2, kind="prompt")
    (ids, w), _ = load_examples([chat], tok, 64)[0]
    assert tok.decode(ids[w == 0].tolist()) == "User: What is 2+2?\n\nAssistant:" and ids[0] == tok.bos_id
    assert ids[w == 1].tolist() == tok.encode(" 4") + [tok.eos_id]
    (ids, w), _ = load_examples([comp], tok, 64)[0]
    assert ids[w == 1].tolist() == tok.encode("4") + [tok.eos_id]
    assert tok.decode(ids[w == 0].tolist()) == "What is 2+2? "


def test_sft_loss_mask_survives_packing(released, sft_file):
    tok = load_tokenizer(released)
    tc = TrainConfig(data=(str(sft_file),), seq_len=128, global_batch=2, seed=3)
    examples, _ = load_examples([sft_file], tok, 128)
    by_ids = {tuple(ids.tolist()): w for ids, w in examples}
    batch = next(iter(make_sft_dataset(tc, tok)))
    packed = 0
    for r in range(2):
        for s in set(batch["segment_ids"][r].tolist()) - {0}:
            idx = np.flatnonzero(batch["segment_ids"][r] == s)
            w = by_ids[tuple(batch["inputs"][r, idx].tolist())]  # the packed example, intact
            np.testing.assert_array_equal(batch["loss_mask"][r, idx[:-1]], w[1:])
            assert batch["loss_mask"][r, idx[-1]] == 0
            packed += 1
    assert packed > 2  # several examples share a row


def test_masked_loss_is_hand_computation_and_prompts_get_no_gradient(released, sft_file):
    tok = load_tokenizer(released)
    batch = next(iter(make_sft_dataset(TrainConfig(data=(str(sft_file),), seq_len=64, global_batch=2), tok)))
    logits = np.random.default_rng(0).normal(size=(*batch["inputs"].shape, 160)).astype(np.float32)
    mask, targets = batch["loss_mask"], batch["targets"]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want = (nll * mask).sum() / mask.sum()
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    grad = np.asarray(jax.grad(cross_entropy)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    assert np.all(grad[mask == 0] == 0) and np.all(np.abs(grad[mask == 1]).sum(-1) > 0)
    assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum() / 2  # prompts dominate; they carry no loss


def test_bad_records(released, tmp_path):
    tok = load_tokenizer(released)
    path = tmp_path / "bad.jsonl"
    write_sft(path, 2)
    with open(path, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "no answer"}]}\n{not json\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: no assistant message"):
        load_examples([path], tok, 64)
    examples, counts = load_examples([path], tok, 64, skip_bad=True)
    assert len(examples) == 2 and counts["skipped"] == 2


# ---- LoRA ---------------------------------------------------------------------------------------------------------

ALL_TARGETS = '["attn","mlp","shared","experts"]'


@pytest.fixture(scope="session")
def lora_run(released, sft_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora") / "run"
    assert main(_train_args(released, work, sft_file, 4, "--set", "lora_rank=4", "--set", "lora_alpha=8",
                            "--set", "lr=3e-2", "--set", f"lora_targets={ALL_TARGETS}")) == 0
    return work


def test_lora_with_zero_b_is_the_base(released):
    from dsv2_jax.train.lora import LoraConfig, adapter_shapes, with_adapters

    base = load_model(released)
    lc = LoraConfig(4, 8.0, ("attn", "mlp", "shared", "experts"))
    shapes = adapter_shapes(base.config, lc)
    assert {p[-1] for p in shapes} == {"wq", "wkv_a", "w_uk", "w_uv", "wo", "w_gate", "w_up", "w_down"}
    rng = np.random.default_rng(0)  # numpy draws: no per-shape compiles (init_adapters runs in the LoRA run)
    adapters = unflatten({(*p, ab): (rng.normal(size=s) if ab == "a" else np.zeros(s)).astype(np.float32)
                          for p, (a, b, _) in shapes.items() for ab, s in (("a", a), ("b", b))})
    graphdef, state = nnx.split(base)
    np.testing.assert_array_equal(logits(nnx.merge(graphdef, with_adapters(state, adapters, lc.scale))),
                                  logits(base))


def test_lora_trains_adapters_only_and_merged_export_matches(lora_run, released, tmp_path):
    from transformers import DeepseekV2ForCausalLM

    from dsv2_jax.checkpoint.train_checkpoints import latest_state_dir
    from dsv2_jax.train.lora import load_adapters, read_lora_run, with_adapters
    from dsv2_jax.checkpoint.orbax_io import OrbaxTreeReader

    stored = OrbaxTreeReader(latest_state_dir(lora_run), ("params",)).paths
    assert stored and {p[-1] for p in stored} == {"a", "b"}  # the checkpoint holds adapters, not the base
    base_dir, lc = read_lora_run(lora_run)
    base = load_model(base_dir)
    adapters = load_adapters(lora_run, base.config, lc)
    assert all(float(jnp.abs(v).max()) > 0 for p, v in flatten(adapters).items() if p[-1] == "b")
    graphdef, state = nnx.split(base)
    adapted = logits(nnx.merge(graphdef, with_adapters(state, adapters, lc.scale)))  # per-layer, unmerged
    assert np.abs(adapted - logits(base)).max() > 1e-3
    np.testing.assert_allclose(logits(load_model(lora_run)), adapted, atol=1e-5, rtol=0)  # generate's path

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), str(tmp_path / "x")]) == 2  # a LoRA run needs --merge-lora
    assert main(["export", str(lora_run), str(out), "--merge-lora", "--quiet"]) == 0
    np.testing.assert_allclose(logits(load_model(out)), adapted, atol=1e-5, rtol=0)
    import torch

    hf = DeepseekV2ForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(adapted, want, atol=1e-4, rtol=0)
