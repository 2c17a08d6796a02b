"""`dsv2 train --config FILE_OR_PRESET --workdir DIR`: train (or resume) a model; metrics in DIR/metrics.jsonl."""

from __future__ import annotations

import json
import sys

from dsv2_jax.parallel import distributed
from dsv2_jax.train.config import TrainConfig


def run(args) -> int:
    from dsv2_jax.cli import USER_ERRORS
    from dsv2_jax.train.loop import TrainingDiverged, train

    try:
        joined = distributed.initialize_from_args(args, label="dsv2 train")
    except distributed.DistributedError as e:
        print(f"dsv2 train: error: {e}", file=sys.stderr)
        return 2
    direct = {"steps": args.steps, "mesh": args.mesh, "data": tuple(args.data) if args.data else None,
              "eval_data": tuple(args.eval_data) if args.eval_data else None,
              "distributed": True if joined else None, "init_from": args.init_from,
              "skip_bad_records": True if args.skip_bad_records else None}
    if args.config is None and args.init_from is None:
        raise ValueError("give --config, --init-from, or both")
    tc = (TrainConfig.load(args.config) if args.config else TrainConfig()).replace(
        **{k: v for k, v in direct.items() if v is not None})
    tc = tc.with_overrides(args.set)
    # This process alone may fail: it stops the others rather than leave them hung in a collective.
    with distributed.stop_the_others_on_failure(USER_ERRORS):
        try:
            summary = train(tc, args.workdir, progress=not args.no_progress)
        except TrainingDiverged as e:  # every process sees the same loss, so all stop here together
            print(f"dsv2 train: {e}", file=sys.stderr)
            return 3
    if distributed.is_primary():
        print(json.dumps(summary, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train or resume a model (sharded, checkpointed)")
    p.add_argument("--config",
                   help="train config JSON (e.g. configs/train-tiny.json), or a model preset / model config JSON "
                        "(ours or an HF config.json)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from these weights (HF dir, `dsv2 convert` output or train workdir) with a fresh "
                        "optimizer; the model config comes from DIR unless --config names one")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="SFT data: skip (and count) malformed records instead of stopping at the first")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and train_config.json go here; "
                                                    "an existing run there is resumed")
    p.add_argument("--steps", type=int, help="total steps (the LR schedule spans them)")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (axes: data, fsdp, expert, tensor)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train config field, or a model field as model.FIELD=VALUE (repeatable)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text/JSONL/ArrayRecord files or directories "
                                                             "(default: the Python standard library sources)")
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out files or directories; with --set eval_every=N logs eval_loss every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(p)
    p.set_defaults(func=run)
