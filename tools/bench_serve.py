"""Serving benchmark: one Poisson workload through continuous batching (paged latent cache) and through the static
DecodeEngine in fixed batches, in one run. Reports throughput, p50/p99 TTFT and TPOT, and the scheduler's step-time
breakdown.

Two comparisons, as rows of one table against the same static run:
  * equal memory (the default, as vLLM/sglang compare): the paged pool gets the static engine's cache bytes
    (--static-batch rows x --max-model-len tokens), and --max-running defaults to what that pool holds of this
    workload's typical request, (pool pages - trash page) // ceil((mean prompt + mean output) / page size),
    rounded down to a power of two (the scheduler pads a call's rows to one: 42 slots would compute 64 rows);
  * equal slots: the same pool, --static-batch running sequences.

Both engines run the same random model (config preset, default "tiny") on this host's default device, in real time,
on the same requests (same prompts, output lengths and arrival times, from --seed): each only sees requests that
have arrived.
  * continuous: `Scheduler` with a slot count (above), admitting and retiring requests at every step;
  * static: `DecodeEngine` in batches of --static-batch formed in arrival order: a batch
    starts when the engine is free and either --static-batch requests are waiting or the oldest has waited
    --batch-timeout s (or no more will arrive); it decodes until its longest request is done. Its shapes are
    fixed: partial batches are padded to --static-batch rows, the cache is --max-model-len long.
Every shape either engine can use is compiled before timing, and the compile caches are checked not to grow
during the timed runs. --repeats alternates the engines and reports medians. Greedy decoding; output lengths are
exact (no EOS), so both engines produce the same tokens.

  python tools/bench_serve.py --requests 64 --rate 100 --repeats 2 --json results.jsonl
  python tools/bench_serve.py --pool-sweep 129,2049,8193     # paged step time vs page-pool size
  python tools/bench_serve.py --batch-sweep 8,16,32,64       # decode step time vs batch, both engines
  python tools/bench_serve.py --step-sweep                   # paged step time vs token rows x table width
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.config import ModelConfig
from dsv2_jax.infer.engine import MIN_BUCKET, DecodeEngine, decode_and_sample, prefill_and_sample
from dsv2_jax.infer.latent_cache import LatentCache
from dsv2_jax.model.transformer import init_model
from dsv2_jax.serve.page_allocator import PageAllocator
from dsv2_jax.serve.paged_cache import pages_for_budget
from dsv2_jax.serve.request import Request, SamplingParams
from dsv2_jax.serve.scheduler import Scheduler, compiled_shapes


def make_workload(n: int, rate: float, prompt_range, output_range, vocab: int, seed: int):
    """[(arrival_s, prompt ids, max_tokens)]: exponential inter-arrival times (Poisson), uniform [lo, hi) lengths."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    return [(float(a), [int(t) for t in rng.integers(3, vocab, int(rng.integers(*prompt_range)))],
             int(rng.integers(*output_range))) for a in arrivals]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def static_cache_bytes(cfg, args) -> int:
    """The static engine's latent cache: --static-batch rows of --max-model-len tokens."""
    return LatentCache.zeros(cfg, args.static_batch, args.max_model_len, jnp.float32).nbytes


def equal_memory_slots(pages: int, args) -> int:
    """Sequences a pool of `pages` (trash page included) holds at this workload's mean request length, rounded
    down to a power of two (the batch bucket)."""
    mean_len = sum(args.prompt_len) / 2 - 0.5 + sum(args.output_len) / 2 - 0.5  # uniform [lo, hi) means
    fits = max((pages - 1) // math.ceil(mean_len / args.page_size), 1)
    return 1 << (fits.bit_length() - 1)


def make_scheduler(model, pages: int, max_running: int, args, max_prefill_tokens: int | None = None) -> Scheduler:
    return Scheduler(model, page_size=args.page_size, num_pages=pages, max_running=max_running,
                     max_tokens_per_step=args.max_tokens_per_step, max_prefill_chunk=args.max_prefill_chunk,
                     max_prefill_tokens=max_prefill_tokens, cache_dtype=jnp.float32, max_model_len=args.max_model_len)


def run_continuous(sched: Scheduler, work) -> tuple[list[list[float]], dict]:
    """Token timestamps (s since start) per request, through the Scheduler stepping in real time; and the
    scheduler's step-time breakdown over this run."""
    assert sched.pages_in_use == 0
    sched.allocator = PageAllocator(sched.cache.num_pages)  # an empty prefix cache: no hits from an earlier run
    reqs = [Request(str(i), p, SamplingParams(max_tokens=n)) for i, (_, p, n) in enumerate(work)]
    times: list[list[float]] = [[] for _ in work]
    before = dict(sched.timings, steps=sched.counters["steps"])
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
    after = dict(sched.timings, steps=sched.counters["steps"])
    return times, {k: after[k] - before[k] for k in after}


def static_engine(model, args) -> DecodeEngine:
    """A DecodeEngine with every prompt bucket compiled at the fixed batch size."""
    engine = DecodeEngine(model, max_len=args.max_model_len, cache_dtype=jnp.float32)
    buckets = sorted({min(max(_pow2(n), MIN_BUCKET), args.max_model_len) for n in range(*args.prompt_len)})
    for t in buckets:
        engine.generate([[1] * t] * args.static_batch, 2)
    return engine


def run_static(engine: DecodeEngine, work, args) -> list[list[float]]:
    """Token timestamps per request through the DecodeEngine in arrival-order batches (see the module doc)."""
    times: list[list[float]] = [[] for _ in work]
    t0, nxt = time.perf_counter(), 0
    while nxt < len(work):
        now = time.perf_counter() - t0
        arrived = sum(1 for a, _, _ in work[nxt:nxt + args.static_batch] if a <= now)
        full = nxt + args.static_batch <= len(work) and arrived == args.static_batch
        last = nxt + arrived == len(work) and arrived > 0
        if not (full or last or (arrived and now - work[nxt][0] >= args.batch_timeout)):
            # sleep until the batch fills or the oldest request's timeout, whichever comes first
            fill = work[min(nxt + args.static_batch, len(work)) - 1][0]
            timeout = work[nxt][0] + args.batch_timeout
            time.sleep(max(min(fill, timeout) - now, 0.0005))
            continue
        batch = list(range(nxt, nxt + arrived))
        nxt += arrived
        prompts = [work[i][1] for i in batch]
        prompts += [[1]] * (args.static_batch - len(batch))  # padding rows: the one compiled batch size
        steps = max(work[i][2] for i in batch)  # one max_new_tokens per batch: run until the longest is done
        for k, _ in enumerate(engine.stream(prompts, steps)):
            now = time.perf_counter() - t0
            for i in batch:
                if k < work[i][2]:
                    times[i].append(now)
    return times


def summarize(name: str, work, times) -> dict:
    ttft = np.array([ts[0] - w[0] for w, ts in zip(work, times)])
    tpot = np.array([(ts[-1] - ts[0]) / (len(ts) - 1) for ts in times if len(ts) > 1])
    tokens = sum(len(ts) for ts in times)
    assert tokens == sum(w[2] for w in work), "an engine lost tokens"
    span = max(ts[-1] for ts in times)
    return {"engine": name, "requests": len(work), "output_tokens": tokens, "makespan_s": span,
            "throughput_tok_s": tokens / span,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_p50_s": float(np.percentile(tpot, 50)), "tpot_p99_s": float(np.percentile(tpot, 99))}


def paged_rows(sched: Scheduler, tables, start: int, chunk: int):
    """One greedy paged step of len(tables) sequences, each computing `chunk` tokens from position `start`:
    chunk x len(tables) token rows (sequence b's tables[b]); samples the first sched.batch_cap sequences' last
    rows; returns the sampled tokens (a device array)."""
    b = len(tables)
    n = b * chunk
    packed = np.stack([np.ones(n, np.int32), np.tile(np.arange(start, start + chunk, dtype=np.int32), b),
                       np.ones(n, np.int32), np.full(n, -1, np.int32)])
    knobs = np.zeros((4, sched.batch_cap), np.int32)
    m = min(b, sched.batch_cap)
    knobs[0, :m] = np.arange(m) * chunk + chunk - 1
    probs = np.stack([np.zeros(sched.batch_cap, np.float32), np.ones(sched.batch_cap, np.float32)])
    return sched._call(sched._no_tokens, packed, np.repeat(tables, chunk, axis=0), knobs, probs)


def pool_sweep(model, pools: list[int], args, rounds: int = 15) -> None:
    """Median ms of one paged step (B decode rows, and B 16-token prefill chunks) per pool size, interleaved."""
    b, w = args.static_batch, -(-args.max_model_len // args.page_size)
    budget = argparse.Namespace(**dict(vars(args), max_tokens_per_step=16 * b))
    scheds = {p: make_scheduler(model, p, b, budget) for p in pools}

    def call(p, t):
        tables = (np.arange(b * w).reshape(b, w) % (p - 1) + 1).astype(np.int32)
        return paged_rows(scheds[p], tables, 100, t)

    res = {(p, t): [] for p in pools for t in (1, 16)}
    for k in range(rounds + 2):
        for p, t in res:
            s = time.perf_counter()
            call(p, t).block_until_ready()
            if k >= 2:
                res[(p, t)].append(time.perf_counter() - s)
    print(f"| pages | pool MiB | decode {b} rows ms | prefill {b}x16 rows ms |\n|---|---|---|---|")
    for p in pools:
        print(f"| {p} | {scheds[p].cache.nbytes / 2**20:.1f} | {np.median(res[(p, 1)]) * 1e3:.2f} | "
              f"{np.median(res[(p, 16)]) * 1e3:.2f} |")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")


def step_sweep(model, args, rounds: int = 10) -> None:
    """Median ms of one paged step (dispatch, and to the result) per (token rows, block-table width), interleaved:
    what a step costs as its rows and its widest sequence grow (decode and prefill rows cost alike)."""
    sched = make_scheduler(model, 129, 32, args)
    shapes = sched.bucket_shapes()
    res = {shape: [] for shape in shapes}
    for k in range(rounds + 2):
        for n, w in shapes:
            tables = (np.arange(n * w).reshape(n, w) % 128 + 1).astype(np.int32)
            s = time.perf_counter()
            out = paged_rows(sched, tables, w * args.page_size - 1, 1)  # n decode rows, full tables
            d = time.perf_counter()
            out.block_until_ready()
            if k >= 2:
                res[(n, w)].append((d - s, time.perf_counter() - s))
    print("| token rows | width (pages) | dispatch ms | step ms |\n|---|---|---|---|")
    for (n, w), ts in res.items():
        print(f"| {n} | {w} | {np.median([t[0] for t in ts]) * 1e3:.2f} | {np.median([t[1] for t in ts]) * 1e3:.2f} |")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")


def batch_sweep(model, batches: list[int], args, rounds: int = 15) -> None:
    """Median ms of one decode step per batch size, interleaved: the paged step [B,1] at a 160-token context
    (3 pages) and the static engine's step over its [B, --max-model-len] cache (same context)."""
    cfg, ctx = model.config, 160
    pages = -(-ctx // args.page_size)
    sched = make_scheduler(model, max(batches) * pages + 1, max(batches),
                           argparse.Namespace(**dict(vars(args), max_tokens_per_step=max(batches))))
    engine = DecodeEngine(model, max_len=args.max_model_len, cache_dtype=jnp.float32)
    knobs = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.key(0)
    static_caches = {}
    for b in batches:  # a cache holding ctx tokens per row, from the engine's own prefill
        tokens, lengths, cache = engine.batch([[5] * ctx] * b, 2)
        _, _, static_caches[b] = prefill_and_sample(engine.model_def, engine.weights, cache, tokens, lengths, key,
                                                    *knobs)

    def paged(b):
        tables = np.zeros((b, sched._width(pages)), np.int32)
        tables[:, :pages] = np.arange(1, b * pages + 1).reshape(b, pages)
        return paged_rows(sched, tables, ctx, 1)

    def static(b):
        tok, _, static_caches[b] = decode_and_sample(engine.model_def, engine.weights, static_caches[b],
                                                     jnp.ones(b, jnp.int32), key, jnp.int32(1), *knobs)
        return tok

    res = {(b, f): [] for b in batches for f in (paged, static)}
    for k in range(rounds + 2):
        for (b, f), ts in res.items():
            s = time.perf_counter()
            f(b).block_until_ready()
            if k >= 2:  # the static cache grows by one token a round: ctx + 17 at most, same work per step
                ts.append(time.perf_counter() - s)
    print("| B | paged decode ms | paged tok/s | static decode ms | static tok/s |\n|---|---|---|---|---|")
    for b in batches:
        mp, ms = np.median(res[(b, paged)]), np.median(res[(b, static)])
        print(f"| {b} | {mp * 1e3:.2f} | {b / mp:.0f} | {ms * 1e3:.2f} | {b / ms:.0f} |")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=100.0, help="mean arrivals per second")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 192), help="uniform range [lo, hi)")
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 128), help="uniform range [lo, hi)")
    ap.add_argument("--static-batch", type=int, default=16, help="the static engine's batch (and equal-slots slots)")
    ap.add_argument("--max-running", type=int, default=None,
                    help="continuous slots at equal memory (default: what the pool holds of the mean request)")
    ap.add_argument("--batch-timeout", type=float, default=0.5, help="s the static engine waits to fill a batch")
    ap.add_argument("--max-tokens-per-step", type=int, default=128, help="token rows per continuous step")
    ap.add_argument("--max-prefill-chunk", type=int, default=None)
    ap.add_argument("--max-prefill-tokens", default=None,
                    help="prefill tokens in a continuous step that also decodes (default: --max-tokens-per-step); "
                         "comma-separated values (0: no cap) run each as its own row, e.g. 0,32")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--no-equal-slots", action="store_true", help="skip the equal-slots row")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per engine, alternating; medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-sweep", default=None, help="comma-separated page counts: time the paged step only")
    ap.add_argument("--batch-sweep", default=None, help="comma-separated batch sizes: time both decode steps only")
    ap.add_argument("--step-sweep", action="store_true", help="time the paged step per (token rows, table width)")
    ap.add_argument("--json", default=None, help="append the result rows to this JSONL file")
    args = ap.parse_args()

    cfg = ModelConfig.preset(args.preset)
    model = init_model(cfg, seed=0)
    if args.pool_sweep:
        pool_sweep(model, [int(p) for p in args.pool_sweep.split(",")], args)
        return
    if args.step_sweep:
        step_sweep(model, args)
        return
    if args.batch_sweep:
        batch_sweep(model, [int(b) for b in args.batch_sweep.split(",")], args)
        return
    work = make_workload(args.requests, args.rate, args.prompt_len, args.output_len, cfg.vocab_size, args.seed)
    pages = pages_for_budget(cfg, args.page_size, jnp.float32, static_cache_bytes(cfg, args))
    slots = args.max_running or equal_memory_slots(pages, args)
    caps = [int(c) or None for c in args.max_prefill_tokens.split(",")] if args.max_prefill_tokens else [None]
    kinds = {f"equal memory ({slots} slots": slots}
    if not args.no_equal_slots:
        kinds[f"equal slots ({args.static_batch} slots"] = args.static_batch
    modes = {f"continuous, {kind}{f', prefill <= {c}/step' if c else ''})": (n, c)
             for kind, n in kinds.items() for c in caps}
    print(f"pool: {pages} pages of {args.page_size} = the static cache's {static_cache_bytes(cfg, args)} B",
          file=sys.stderr)
    scheds = {name: make_scheduler(model, pages, n, args, c) for name, (n, c) in modes.items()}
    t = time.perf_counter()
    shapes = sum(s.warmup() for s in scheds.values())
    print(f"compiled {shapes} scheduler shapes in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    t = time.perf_counter()
    engine = static_engine(model, args)
    print(f"compiled the static engine's shapes in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    compiles = (compiled_shapes(), prefill_and_sample._cache_size(), decode_and_sample._cache_size())
    static_name = f"static DecodeEngine, batches of {args.static_batch}"
    runs: dict[str, list[dict]] = {name: [] for name in [*modes, static_name]}
    breakdowns: dict[str, list[dict]] = {name: [] for name in modes}
    loads = [os.getloadavg()[0]]
    for k in range(args.repeats):
        print(f"timed run {k + 1}/{args.repeats}", file=sys.stderr)
        for name, sched in scheds.items():
            times, breakdown = run_continuous(sched, work)
            runs[name].append(summarize(name, work, times))
            breakdowns[name].append(breakdown)
        runs[static_name].append(summarize(static_name, work, run_static(engine, work, args)))
        loads.append(os.getloadavg()[0])
    recompiled = (compiled_shapes(), prefill_and_sample._cache_size(), decode_and_sample._cache_size()) != compiles

    rows = []
    for name, rs in runs.items():
        row = {k: (v if isinstance(v, str) else float(np.median([r[k] for r in rs]))) for k, v in rs[0].items()}
        rows.append(row)
    base = rows[-1]["throughput_tok_s"]
    for r in rows:
        r.update(throughput_x=r["throughput_tok_s"] / base, loadavg_1m=loads, rate=args.rate, pool_pages=pages,
                 static_batch=args.static_batch, max_running=modes.get(r["engine"], (None,))[0],
                 max_prefill_tokens=modes.get(r["engine"], (None, None))[1], preset=args.preset,
                 repeats=args.repeats, recompiled=recompiled)
    cols = ["engine", "throughput_tok_s", "throughput_x", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
            "makespan_s", "output_tokens"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    totals = {}
    for name, bds in breakdowns.items():
        bd = totals[name] = {k: sum(b[k] for b in bds) for k in bds[0]}
        steps = max(bd["steps"], 1)
        print(f"{name}, {bd['steps']} steps: ms/step " + ", ".join(
            f"{k[:-2]} {bd[k] / steps * 1e3:.2f}"
            for k in ("schedule_s", "prepare_s", "dispatch_s", "wait_s", "finish_s")) +
            f"; {bd['prefill_steps']} steps with prefill; {bd['tokens']} tokens ({bd['prefill_tokens']} prefill) "
            f"in {bd['rows']} token rows ({bd['tokens'] / max(bd['rows'], 1):.0%} used)")
    print(f"recompiled during timed runs: {recompiled}; load average (1 min) per run: "
          + ", ".join(f"{x:.2f}" for x in loads))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, breakdown=totals.get(r["engine"]))) + "\n")


if __name__ == "__main__":
    main()
