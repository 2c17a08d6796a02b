"""The training loop: data → sharded jitted step → metrics JSONL → async Orbax checkpoints, resumable exactly.

    summary = train(TrainConfig.load("configs/train-tiny.json"), "runs/tiny")

A run resumes from the newest checkpoint in WORKDIR/checkpoints (train state + data iterator position), so
"N steps, kill -9, rerun" reproduces the uninterrupted run's losses bit for bit on CPU. A non-finite loss stops
the run with TrainingDiverged (so does a non-finite gradient norm, or, at a checkpoint step, parameters that are
non-finite or give a non-finite loss); that state is never checkpointed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from dsv2_jax.checkpoint.train_checkpoints import RunCheckpoints
from dsv2_jax.config import ModelConfig
from dsv2_jax.train.divergence import unsaveable
from dsv2_jax.model.flops import peak_flops, train_flops_per_token
from dsv2_jax.train.init_from import initial_state, make_trainer
from dsv2_jax.train.lora import write_lora_json
from dsv2_jax.train.metrics_log import MetricsLog
from dsv2_jax.parallel import distributed
from dsv2_jax.parallel.sharding import batch_divisor, make_mesh, shard_batch
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.state import BATCH_KEYS


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


def make_dataset(tc: TrainConfig, cfg: ModelConfig, held_out: bool = False):
    """The grain pipeline of dsv2_jax.train.data over tc.data (default: the embedded stdlib corpus), or one ordered
    pass over tc.eval_data."""
    from dsv2_jax.train.data import make_dataset as grain_dataset
    from dsv2_jax.train.init_from import tokenizer_path
    from dsv2_jax.train.sft_data import is_sft, make_sft_dataset
    from dsv2_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path(tc))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's vocab_size "
                         f"({cfg.vocab_size})")
    if is_sft(tc, held_out):
        return make_sft_dataset(tc, tokenizer, held_out)
    if held_out:
        return grain_dataset(list(tc.eval_data), tokenizer, tc.seq_len, tc.global_batch, tc.seed, num_epochs=1,
                             shuffle=False)
    return grain_dataset(list(tc.data) or None, tokenizer, tc.seq_len, tc.global_batch, tc.seed)


def evaluate(trainer, params, eval_dataset, batches: int, mesh) -> float:
    """Token-weighted mean next-token loss over the first `batches` batches of the held-out set."""
    nll = tokens = 0.0
    for batch in itertools.islice(iter(eval_dataset), batches):
        s, n = trainer.eval_step(params, shard_batch({k: batch[k] for k in BATCH_KEYS}, mesh))
        nll, tokens = nll + float(s), tokens + float(n)
    return nll / max(tokens, 1.0)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _record(step: int, metrics: dict, step_time: float, tokens: int, flops_per_token: float, peak) -> dict:
    out: dict[str, Any] = {"step": step}
    for k, v in metrics.items():
        if k == "expert_load":
            out[k] = np.round(np.asarray(v), 4).tolist()
        else:
            out[k] = float(v)
    out["step_time_s"] = step_time
    out["tokens_per_s"] = tokens / step_time
    out["mfu"] = None if peak is None else out["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
    return out


def train(tc: TrainConfig, workdir: str | Path, *, dataset=None, progress: bool = True) -> dict[str, Any]:
    """Trains (or resumes) up to tc.steps; returns a summary (first/last loss, tokens/s, last checkpoint).

    dataset: any grain dataset yielding the batch dicts of dsv2_jax.train.data (default: built from tc)."""
    if tc.distributed:
        distributed.initialize()  # no-op when `dsv2 train` already joined with explicit settings
    mesh = make_mesh(tc.mesh)
    cfg = tc.model_config()
    if tc.global_batch % batch_divisor(mesh):
        raise ValueError(f"global_batch {tc.global_batch} is not divisible by the mesh's batch-parallel size "
                         f"{batch_divisor(mesh)} (data × fsdp × expert)")
    # Everything a user can get wrong (config, mesh, data paths) fails before the workdir is touched.
    iterator = iter(dataset if dataset is not None else make_dataset(tc, cfg))
    eval_dataset = make_dataset(tc, cfg, held_out=True) if tc.eval_every else None
    trainer = make_trainer(tc, mesh, cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = RunCheckpoints(workdir, tc.keep_checkpoints)  # one run per workdir: refuses if it is in use
    checkpoints.check_model_config(cfg)
    distributed.same_on_all_processes(
        checkpoints.latest_step() or 0, "the checkpoint step to resume from",
        f"--workdir {workdir} must be one directory shared by all hosts")
    start, state = checkpoints.restore_latest(trainer.restore_target(), iterator)
    if start:
        if tc.init_from and distributed.is_primary():
            print(f"dsv2 train: resuming {workdir} from step {start}; init_from {tc.init_from} is not used",
                  file=sys.stderr)
    elif tc.init_from and not tc.lora_rank:
        state = initial_state(trainer, tc.init_from)  # released weights, fresh optimizer and schedule
    else:
        state = trainer.init_state(tc.seed)  # random weights, or fresh LoRA adapters on the loaded base
    if distributed.is_primary():
        _write_json(workdir / "train_config.json", tc.to_dict())
        cfg.to_json(workdir / "dsv2_config.json")  # lets load_model / dsv2 generate / dsv2 export read the run
        if tc.lora_rank:
            write_lora_json(workdir, tc)  # the base the adapters belong to
    log = MetricsLog(workdir, resume_step=start, enabled=distributed.is_primary())
    flops_per_token = train_flops_per_token(cfg, tc.seq_len)
    peak = peak_flops(jax.devices()[0])
    tokens = tc.global_batch * tc.seq_len
    losses, speeds, last_saved = [], [], start or None
    distributed.compile_together(trainer.step, state, {  # multi-host: start the first step together
        k: jax.ShapeDtypeStruct((tc.global_batch, tc.seq_len), np.float32 if k == "loss_mask" else np.int32,
                                sharding=trainer.batch_sharding) for k in BATCH_KEYS})
    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=not progress or not distributed.is_primary(),
               dynamic_ncols=True)
    try:
        tick = time.perf_counter()
        for step in range(start + 1, tc.steps + 1):
            batch = next(iterator)
            batch = shard_batch({k: batch[k] for k in BATCH_KEYS}, mesh)
            state, metrics = trainer.step(state, batch)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
            now = time.perf_counter()
            what = (f"loss ({loss})" if not math.isfinite(loss) else
                    f"gradient norm ({grad_norm})" if not math.isfinite(grad_norm) else None)
            if what is None and (step % tc.checkpoint_every == 0 or step == tc.steps):
                what = unsaveable(trainer, state["params"], batch)  # checks what the checkpoint would hold
            if what:
                checkpoints.wait()
                raise TrainingDiverged(
                    f"non-finite {what} at step {step}; stopping. Last good checkpoint: "
                    + (f"step {last_saved} in {checkpoints.directory}" if last_saved else "none"))
            record = _record(step, jax.device_get(metrics), now - tick, tokens, flops_per_token, peak)
            tick = now
            if eval_dataset is not None and (step % tc.eval_every == 0 or step == tc.steps):
                record["eval_loss"] = evaluate(trainer, state["params"], eval_dataset, tc.eval_batches, mesh)
            losses.append(loss)
            if step > start + 1:  # the first step of a process includes compilation
                speeds.append(record["tokens_per_s"])
            if step % tc.log_every == 0 or step == tc.steps or "eval_loss" in record:
                log.write(record)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoints.save(step, state, iterator)
                last_saved = step
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        checkpoints.wait()
    finally:
        bar.close()
        log.close()
        checkpoints.close()
    return {"start_step": start, "steps": tc.steps, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "tokens_per_s": float(np.median(speeds)) if speeds else None,
            "last_checkpoint": last_saved, "workdir": str(workdir)}
