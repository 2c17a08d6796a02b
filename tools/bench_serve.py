"""Serving benchmark: the same Poisson workload through continuous batching (paged latent cache) and through the
static DecodeEngine in fixed batches, in one run. Reports throughput and p50/p99 TTFT / TPOT.

Both engines run a random model from a config preset (default "tiny") on this host's default device, in real
time: requests arrive at their Poisson times, and each engine only sees requests that have arrived. The static
engine takes the next `--static-batch` requests once they have all arrived (or the last ones), decodes the batch
until its longest request is done and only then starts the next; continuous batching admits and retires
requests at every step. Each engine runs the whole workload once untimed first, so compilation is not measured.

  python tools/bench_serve.py --requests 48 --rate 8 --json results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np

from dsv2_jax.config import ModelConfig
from dsv2_jax.infer.engine import DecodeEngine
from dsv2_jax.model.transformer import init_model
from dsv2_jax.serve.request import Request, SamplingParams
from dsv2_jax.serve.scheduler import Scheduler


def make_workload(n: int, rate: float, prompt_range, output_range, vocab: int, seed: int):
    """[(arrival_s, prompt ids, max_tokens)] with exponential inter-arrival times (Poisson process)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    return [(float(a), [int(t) for t in rng.integers(3, vocab, int(rng.integers(*prompt_range)))],
             int(rng.integers(*output_range))) for a in arrivals]


def run_continuous(model, work, args) -> list[list[float]]:
    """Token timestamps (s since start) per request, through the Scheduler stepping in real time."""
    # The pool holds max_running full-length sequences, as the static engine's cache holds its batch (on CPU a
    # step's cache scatter costs time in proportion to the pool).
    pages = args.max_running * -(-args.max_model_len // args.page_size) + 1
    sched = Scheduler(model, page_size=args.page_size, num_pages=pages, max_running=args.max_running,
                      max_tokens_per_step=args.max_tokens_per_step, cache_dtype=jnp.float32,
                      max_model_len=args.max_model_len)
    sched.warmup()  # every bucket shape; the static engine's shapes are compiled by its untimed first pass
    reqs = [Request(str(i), p, SamplingParams(max_tokens=n)) for i, (_, p, n) in enumerate(work)]
    times: list[list[float]] = [[] for _ in work]
    t0, nxt = time.perf_counter(), 0
    while nxt < len(work) or sched.has_work:
        now = time.perf_counter() - t0
        while nxt < len(work) and work[nxt][0] <= now:
            reqs[nxt].arrival = t0 + work[nxt][0]
            sched.add(reqs[nxt])
            nxt += 1
        if not sched.has_work:
            time.sleep(max(work[nxt][0] - now, 0))
            continue
        outs = sched.step()
        now = time.perf_counter() - t0
        for o in outs:
            times[int(o.request.id)].append(now)
    assert sched.pages_in_use == 0
    return times


def run_static(model, work, args) -> list[list[float]]:
    """Token timestamps per request through DecodeEngine in FCFS batches of --static-batch."""
    engine = DecodeEngine(model, cache_dtype=jnp.float32)  # cache sized per batch, as `generate` does
    times: list[list[float]] = [[] for _ in work]
    t0 = time.perf_counter()
    for start in range(0, len(work), args.static_batch):
        batch = list(range(start, min(start + args.static_batch, len(work))))
        wait = work[batch[-1]][0] - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        steps = max(work[i][2] for i in batch)  # one max_new_tokens per batch: run until the longest is done
        for k, step in enumerate(engine.stream([work[i][1] for i in batch], steps)):
            now = time.perf_counter() - t0
            for i in batch:
                if k < work[i][2]:
                    times[i].append(now)
    return times


def summarize(name: str, work, times) -> dict:
    ttft = np.array([ts[0] - w[0] for w, ts in zip(work, times)])
    tpot = np.array([(ts[-1] - ts[0]) / (len(ts) - 1) for ts in times if len(ts) > 1])
    tokens = sum(len(ts) for ts in times)
    span = max(ts[-1] for ts in times)
    return {"engine": name, "requests": len(work), "output_tokens": tokens, "makespan_s": round(span, 3),
            "throughput_tok_s": round(tokens / span, 1),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4), "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
            "tpot_p50_s": round(float(np.percentile(tpot, 50)), 5), "tpot_p99_s": round(float(np.percentile(tpot, 99)), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 192), help="uniform range [lo, hi)")
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 128), help="uniform range [lo, hi)")
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--max-tokens-per-step", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append the result rows to this JSONL file")
    args = ap.parse_args()

    cfg = ModelConfig.preset(args.preset)
    model = init_model(cfg, seed=0)
    work = make_workload(args.requests, args.rate, args.prompt_len, args.output_len, cfg.vocab_size, args.seed)
    rows = []
    for name, fn in (("continuous", run_continuous), ("static", run_static)):
        fn(model, work, args)  # warm-up: compiles every shape this workload needs
        rows.append(summarize(name, work, fn(model, work, args)))
    load = os.getloadavg()
    base = rows[1]
    for r in rows:
        r.update(throughput_x=round(r["throughput_tok_s"] / base["throughput_tok_s"], 2),
                 loadavg_1m=round(load[0], 2), rate=args.rate, static_batch=args.static_batch,
                 max_running=args.max_running, preset=args.preset)
    cols = ["engine", "throughput_tok_s", "throughput_x", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
            "makespan_s", "output_tokens"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"load average (1 min): {load[0]:.2f}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
