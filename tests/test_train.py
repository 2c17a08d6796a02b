"""Training: schedule, FLOP count, sharded step == single device, exact resume after kill -9, NaN stop, CLI errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dsv2_jax import cli
from dsv2_jax.config import ConfigError, ModelConfig
from dsv2_jax.model.flops import forward_flops_per_token, train_flops_per_token
from dsv2_jax.train.metrics_log import read_metrics
from dsv2_jax.train.schedule import learning_rate
from dsv2_jax.parallel.sharding import make_mesh, shard_batch
from dsv2_jax.train.loop import TrainingDiverged, train
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.state import Trainer
from tests.train_fixtures import make_batch, synthetic_dataset, make_test_config

ROOT = Path(__file__).resolve().parent.parent


def test_schedule_warmup_then_step_decay():
    lr = learning_rate(TrainConfig(lr=1.0, warmup_steps=10, steps=100))
    got = [float(lr(s)) for s in (0, 5, 10, 59, 60, 89, 90, 99)]
    np.testing.assert_allclose(got, [0, 0.5, 1, 1, 0.316, 0.316, 0.316**2, 0.316**2], rtol=1e-6)


def test_flop_count_matches_hand_count():
    # tiny: D 64, H 4, q_lora 48, kv_lora 32, rope 8, nope 16, v 16, dense 160, 8 experts × 32 top-2, 1 shared,
    # vocab 512, 4 layers (1 dense + 3 MoE), seq 256 → 128 keys per query on average.
    attn = (2 * 64 * 48 + 2 * 48 * 4 * 24) + (2 * 64 * 40 + 2 * 32 * 4 * 32) + 2 * 4 * 16 * 64 \
        + 2 * 4 * 24 * 128 + 2 * 4 * 16 * 128
    assert attn == 77824
    dense, moe, head = 6 * 64 * 160, 2 * 64 * 8 + 2 * 6 * 64 * 32 + 6 * 64 * 32, 2 * 64 * 512
    cfg = ModelConfig.preset("tiny")
    assert forward_flops_per_token(cfg, 256) == 4 * attn + dense + 3 * moe + head == 551936
    assert train_flops_per_token(cfg, 256) == 3 * 551936


def test_train_config_overrides_and_errors():
    tc = TrainConfig.load(str(ROOT / "configs/train-tiny.json")).with_overrides(
        ["lr=1e-4", "model.num_hidden_layers=2", "mesh=data=2"])
    assert tc.lr == 1e-4 and tc.mesh == "data=2" and tc.model_config().num_hidden_layers == 2
    with pytest.raises(ConfigError, match="unknown train config field 'bogus'"):
        tc.with_overrides(["bogus=1"])
    with pytest.raises(ConfigError, match="remat"):
        tc.with_overrides(["remat=sometimes"])
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainConfig.load("nope")


@pytest.fixture(scope="module")
def single_device_run():
    tc = make_test_config()
    trainer = Trainer(tc, make_mesh(""))
    state = trainer.init_state(tc.seed)
    initial = jax.device_get(state)
    losses = []
    for i in range(2):
        state, m = trainer.step(state, make_batch(i, 8, 16))
        losses.append(float(m["loss"]))
    return tc, initial, losses, jax.device_get(state["params"])


@pytest.mark.parametrize("spec", ["data=2,expert=4", "fsdp=2,tensor=2,expert=2"])
def test_sharded_train_step_matches_single_device(single_device_run, spec):
    tc, initial, want_losses, want_params = single_device_run
    mesh = make_mesh(spec)
    trainer = Trainer(tc.replace(mesh=spec), mesh)
    state = jax.device_put(initial, trainer.state_shardings)
    losses = []
    for i in range(2):
        state, m = trainer.step(state, shard_batch(make_batch(i, 8, 16), mesh))
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(got, want, atol=2e-5)
    spec_of = trainer.state_shardings["params"]["moe_layers"]["mlp"]["w_gate"].get_value().spec
    assert "expert" in spec_of  # the experts really are split


RUN_SCRIPT = """
import sys
from tests.train_fixtures import synthetic_dataset, make_test_config
from dsv2_jax.train.loop import train
stall = None if sys.argv[2] == "none" else int(sys.argv[2])
train(make_test_config(steps=8, checkpoint_every=4), sys.argv[1], dataset=synthetic_dataset(8, 16, stall_at=stall),
      progress=False)
"""


def _run(workdir, stall, env, wait=True):
    args = [sys.executable, "-c", RUN_SCRIPT, str(workdir), str(stall)]
    log = Path(f"{workdir}.{time.monotonic_ns()}.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    if wait:
        _finish(proc)
    return proc


def _finish(proc):
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.log.read_text()[-3000:]


def test_resume_after_sigkill_reproduces_uninterrupted_losses(tmp_path):
    # The session's environment (XLA_FLAGS, compilation cache): the runs load the step that single_device_run
    # compiled (the same program) instead of compiling it again; the uninterrupted run overlaps the killed one.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    straight = _run(tmp_path / "straight", "none", env, wait=False)
    # Steps 1-5 run, checkpoint 4 is written, then the run blocks fetching batch 5 (step 6) and is killed.
    proc = _run(tmp_path / "killed", 5, env, wait=False)
    deadline = time.time() + 240
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while not (metrics.exists() and '"step": 5' in metrics.read_text()
               and (tmp_path / "killed" / "checkpoints" / "4").is_dir()):
        assert proc.poll() is None and time.time() < deadline, "run ended or hung before step 5"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _finish(straight)
    _run(tmp_path / "killed", "none", env)
    straight = [m["loss"] for m in read_metrics(tmp_path / "straight")]
    resumed = [m["loss"] for m in read_metrics(tmp_path / "killed")]
    assert [m["step"] for m in read_metrics(tmp_path / "killed")] == list(range(1, 9))
    assert resumed == straight  # bitwise


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tc = make_test_config(lr=1e9, warmup_steps=0, steps=8, checkpoint_every=1)
    # Step 1's loss (computed before its update) is finite, but the parameters it leaves give a NaN loss: the
    # state a checkpoint would hold is checked, so it is never saved as "the last good checkpoint".
    with pytest.raises(TrainingDiverged, match=r"non-finite (parameters|loss of the updated parameters) .*at step 1; "
                                               r"stopping\. Last good checkpoint: none"):
        train(tc, tmp_path, dataset=synthetic_dataset(8, 16), progress=False)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(np.isfinite(m["loss"]) for m in read_metrics(tmp_path))


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "missing.json"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.json: file not found" in err
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--set", "lr"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def _missing(p):
    return p / "does-not-exist"


def _empty_dir(p):
    (p / "empty").mkdir()
    return p / "empty"


def _blank_file(p):
    (p / "blank.txt").write_text("")
    return p / "blank.txt"


@pytest.mark.parametrize("make_source, message", [
    (_missing, "does not exist"), (_empty_dir, "no usable files"), (_blank_file, "empty corpus")])
def test_cli_bad_data_paths_fail_clearly(tmp_path, capsys, make_source, message):
    pytest.importorskip("dsv2_jax.train.data")
    source = make_source(tmp_path)
    rc = cli.main(["train", "--config", "configs/train-tiny.json", "--workdir", str(tmp_path / "w"),
                   "--data", str(source), "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_training_run_loads_generates_and_exports(tmp_path):
    """A `dsv2 train` workdir is a checkpoint: load_model, dsv2 generate and dsv2 export all read its newest step."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    import dsv2_jax

    train(make_test_config(steps=4, checkpoint_every=4), tmp_path / "run", dataset=synthetic_dataset(8, 16),
          progress=False)
    model = dsv2_jax.load_model(tmp_path / "run")
    ids = np.random.default_rng(0).integers(0, 259, (2, 12)).astype(np.int32)
    ours = np.asarray(model(ids))
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                "--json"]) == 0
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--quiet"]) == 0
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4


def test_eval_loss_on_held_out_data_is_logged(tmp_path):
    """eval_every / eval_data: a fixed held-out prefix is scored (no balance losses, no dropping) and logged."""
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    tc = make_test_config(steps=4, eval_every=2, eval_batches=2, eval_data=(str(held_out),))
    train(tc, tmp_path / "run", dataset=synthetic_dataset(8, 16), progress=False)
    evals = [(m["step"], m["eval_loss"]) for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    assert [s for s, _ in evals] == [2, 4]
    assert all(np.isfinite(v) and 0 < v < 10 for _, v in evals)
    with pytest.raises(ConfigError, match="eval_every.*needs eval_data"):
        make_test_config(eval_every=2)
