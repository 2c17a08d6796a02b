"""Training throughput on the current backend: tokens/s, achieved model TFLOP/s and MFU of the jitted step.

    python tools/bench_train.py --config configs/train-tiny.json [--mesh data=2,expert=4] [--set KEY=VALUE ...]

Random tokens (packed-batch layout, one document per row) so the data pipeline is not measured. MFU uses
dsv2_jax.model.flops (MLA + MoE matmul FLOPs) and the chip's bf16 peak (or --peak-tflops per device).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from dsv2_jax.model.flops import peak_flops, train_flops_per_token
from dsv2_jax.parallel.sharding import make_mesh, shard_batch
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.state import Trainer


def random_batch(tc: TrainConfig, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (tc.global_batch, tc.seq_len)
    inputs = rng.integers(0, vocab, shape).astype(np.int32)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(tc.seq_len, dtype=np.int32), shape).copy(),
            "loss_mask": np.ones(shape, np.float32)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train-tiny.json", help="train config JSON or model preset")
    ap.add_argument("--mesh", help="e.g. data=2,expert=4")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after one compile step)")
    ap.add_argument("--peak-tflops", type=float, help="per-device peak, if the device is not in flops.PEAK_FLOPS")
    args = ap.parse_args(argv)
    tc = TrainConfig.load(args.config).with_overrides(args.set)
    if args.mesh:
        tc = tc.replace(mesh=args.mesh)
    mesh = make_mesh(tc.mesh)
    trainer = Trainer(tc, mesh)
    state = trainer.init_state(tc.seed)
    batch = shard_batch(random_batch(tc, trainer.cfg.vocab_size), mesh)
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = trainer.step(state, batch)
    float(metrics["loss"])
    step_s = (time.perf_counter() - t0) / args.steps
    tokens_per_s = tc.global_batch * tc.seq_len / step_s
    model_flops = tokens_per_s * train_flops_per_token(trainer.cfg, tc.seq_len)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(jax.devices()[0])
    result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "devices": mesh.size,
              "mesh": dict(mesh.shape), "global_batch": tc.global_batch, "seq_len": tc.seq_len,
              "compute_dtype": tc.compute_dtype, "first_step_s": round(compile_s, 2),
              "step_s": step_s, "tokens_per_s": round(tokens_per_s, 1),
              "model_tflops_per_s": model_flops / 1e12,
              "mfu": None if peak is None else model_flops / (peak * mesh.size)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
