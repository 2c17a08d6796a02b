"""MoE cost against the number of stored experts: every grouped-GEMM backend here vs transformers + torch.

    python tools/bench_moe.py --whole-model [--experts 4,16,64,160] [--shapes lite/16,tiny] [--reps 10] [--quick]
                              [--torch-threads N] [--out bench_moe.jsonl]

(1) One DeepSeekMoE layer (router + routed experts + shared experts) at fixed tokens, top-k and expert width:
    forward+backward ms for each E, each backend and transformers' DeepseekV2Moe holding the same weights
    (torch, same run), at two shapes (SHAPES):
      * lite/16 — DeepSeek-V2-Lite's MoE layer scaled down 16× in width (hidden 2048 → 128, expert width
        1408 → 88; 2 shared experts). The routed experts' FLOPs per weight byte are 2·N·K / (E·bytes),
        whatever D and F, so what must match the real model is N·K / E, the rows per expert: 3072 tokens ×
        top-4 (top-6 cannot run at E=4) = 12,288 expert rows, as V2-Lite's 2,048-token per-device micro-batch ×
        top-6: 192 rows per expert at E=64 (V2-Lite) and 77 at E=160 (V2 at the same batch), so the weight /
        weight-grad traffic that grows with E weighs on the step as in the real models. transformers runs
        here only up to E=16 (its per-expert Python loop takes tens of seconds a step beyond).
      * tiny — hidden 64, expert width 32, top-4, 1 shared, 512 tokens (the old default): 5 rows per expert at
        E=160, where the O(E·D·F) weight-grad writes and per-step overheads are a large part of a ~5 ms step.
    The tiny shape also runs the dense paths (XLA ragged_dot, the reference) and decode steps at B=1 / B=32
    with outputs checked equal to transformers'.
(2) --whole-model: the tiny preset's jitted train step (fp32, 4 × 128 tokens, AdamW, state donated) for each E
    and transformers + torch AdamW at E=16, plus the AdamW update alone per E; decode vs transformers' eager
    generate (tools/bench_decode.py: B=8, 200-token prompts, 64 new tokens) at E=16, and our B=1 decode
    ms/token for each E (the median of 7 rotated rounds).
Every forward+backward and train step is timed in interleaved rounds (each variant once per round; median over
rounds), so load drift hits all alike. Prints medians, markdown tables with the E ratios, the issue's goal table
(#10) and `uptime` (timings on a loaded machine are noise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools: bench_train, bench_decode

from dsv2_jax.model import moe  # noqa: E402
from dsv2_jax.config import ModelConfig, to_hf_dict  # noqa: E402
from dsv2_jax.model.transformer import init_model  # noqa: E402
from dsv2_jax.train.host_heap import keep_freed_heap  # noqa: E402


def median_ms(fn, reps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


# name: tokens, top-k, hidden, expert width, shared experts, dense paths + decode (too slow at the big shape).
SHAPES = {
    "lite/16": dict(tokens=3072, topk=4, hidden=128, width=88, shared=2, full=False),
    "tiny": dict(tokens=512, topk=4, hidden=64, width=32, shared=1, full=True),
}


def layer_config(e: int, shape: dict) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(
        n_routed_experts=e, num_experts_per_tok=shape["topk"], topk_method="greedy", n_group=1, topk_group=1,
        hidden_size=shape["hidden"], moe_intermediate_size=shape["width"], n_shared_experts=shape["shared"],
        norm_topk_prob=False)


def layer_pair(cfg: ModelConfig, seed: int = 0):
    """transformers' DeepseekV2MoE with random weights, and our MoE's parameter state holding the same."""
    import torch
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    torch.manual_seed(seed)
    tm = DeepseekV2Moe(DeepseekV2Config(**to_hf_dict(cfg))).float()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0.0, 0.1)
    f = cfg.moe_intermediate_size
    t = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    ours = moe.MoE(cfg, jnp.float32)
    ours.w_router.value = jnp.asarray(t["gate.weight"].T)
    ours.w_gate.value = jnp.asarray(t["experts.gate_up_proj"][:, :f].transpose(0, 2, 1))
    ours.w_up.value = jnp.asarray(t["experts.gate_up_proj"][:, f:].transpose(0, 2, 1))
    ours.w_down.value = jnp.asarray(t["experts.down_proj"].transpose(0, 2, 1))
    for name in ("gate", "up", "down"):
        getattr(ours.shared, f"w_{name}").value = jnp.asarray(t[f"shared_experts.{name}_proj.weight"].T)
    return tm, nnx.state(ours)


def our_impls(train: bool, dense: bool = True) -> list[tuple[str, dict]]:
    """(label, config fields) of every path that runs on this backend (`dense`: with XLA's ragged_dot)."""
    impls = [("auto", {}), ("blocked", {"grouped_gemm": "blocked"})]
    if dense:
        impls.append(("ragged_dot (XLA)", {"grouped_gemm": "ragged_dot"}))
    if not train:
        impls.insert(1, ("gather", {"grouped_gemm": "gather"}))
    if jax.default_backend() in ("gpu", "tpu"):
        impls.append(("tokamax", {"grouped_gemm": "tokamax"}))
    return impls


def layer_train_steps(e: int, name: str, args):
    """(transformers' layer, our parameter state, rng, {(E, impl): a forward+backward step}) at shape `name`."""
    import torch

    shape = SHAPES[name]
    cfg = layer_config(e, shape)
    tm, state = layer_pair(cfg)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, shape["tokens"], cfg.hidden_size)).astype(np.float32)
    steps = {}
    dense = shape["full"] and not args.quick
    impls = our_impls(train=True, dense=shape["full"]) + ([("reference (dense)", {"moe_impl": "reference"})]
                                                            if dense else [])
    xj = jnp.asarray(x)
    for label, fields in impls:
        graphdef = nnx.graphdef(moe.MoE(cfg.replace(**fields), jnp.float32))

        def loss(params, x, graphdef=graphdef):
            y, _ = nnx.merge(graphdef, params)(x)
            return jnp.sum(y * y)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        steps[e, label] = lambda step=step: jax.block_until_ready(step(state, xj))
    xt = torch.tensor(x, requires_grad=True)

    def torch_train():
        for p in (*tm.parameters(), xt):
            p.grad = None
        (tm(xt) ** 2).sum().backward()
    if shape["full"] or e <= 16:  # its per-expert Python loop takes tens of seconds a step beyond
        steps[e, "transformers"] = torch_train
    return cfg, tm, state, rng, steps


def bench_shape(experts: list[int], name: str, args) -> list[dict]:
    """Forward+backward of every path at every E, timed in interleaved rounds; then (tiny) the decode steps."""
    built = {e: layer_train_steps(e, name, args) for e in experts}
    times = interleaved({k: fn for *_, steps in built.values() for k, fn in steps.items()}, args.reps)
    rows = [{"bench": "moe_layer", "shape": name, "kind": "train", "impl": impl, "experts": e, "ms": ms}
            for (e, impl), ms in times.items()]
    for r in rows:
        print(f"{name:<7} E={r['experts']:<4} train        {r['impl']:<18} {r['ms']:10.3f} ms", flush=True)
    if SHAPES[name]["full"]:
        for e, (cfg, tm, state, rng, _) in built.items():
            rows += bench_layer_decode(e, name, cfg, tm, state, rng, args)
    return rows


def interleaved(steps: dict, reps: int, pause_s: float = 0.1) -> dict:
    """Median ms of each step, timed in `reps` rounds that run every step once (after one warm-up call each), so
    a change in machine load hits every variant alike; each round starts one variant later. An untimed pause
    after each call lets the finished framework's worker threads stop spinning: torch's OpenMP threads and XLA's
    pool busy-wait for a while after a step, and timing the other framework in that window measured it up to 25×
    slower."""
    for fn in steps.values():
        fn()
    times = {k: [] for k in steps}
    keys = list(steps)
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotated: no variant always follows the same one
            fn = steps[k]
            time.sleep(pause_s)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def bench_layer_decode(e: int, name: str, cfg, tm, state, rng, args) -> list[dict]:
    import torch

    rows = []

    def row(kind, impl, ms):
        rows.append({"bench": "moe_layer", "shape": name, "kind": kind, "impl": impl, "experts": e, "ms": ms})
        print(f"{name:<7} E={e:<4} {kind:<12} {impl:<18} {ms:10.3f} ms", flush=True)

    for b in (1, 32):
        xb = rng.normal(size=(b, 1, cfg.hidden_size)).astype(np.float32)
        outs = {}
        for label, fields in our_impls(train=False):
            graphdef = nnx.graphdef(moe.MoE(cfg.replace(**fields), jnp.float32))
            fwd = jax.jit(lambda params, x, graphdef=graphdef: nnx.merge(graphdef, params)(x)[0])
            xj = jnp.asarray(xb)
            outs[label] = np.asarray(fwd(state, xj))
            row(f"decode B={b}", label, median_ms(lambda: jax.block_until_ready(fwd(state, xj)), args.reps * 4))
        with torch.no_grad():
            xtb = torch.tensor(xb)
            want = tm(xtb).numpy()
            row(f"decode B={b}", "transformers", median_ms(lambda: tm(xtb), args.reps * 4))
        worst = max(float(np.abs(o - want).max()) for o in outs.values())
        assert worst < 1e-4, f"E={e} B={b}: ours differs from transformers by {worst}"
    return rows


def markdown(rows: list[dict], value, title: str, ratios: bool = True) -> str:
    """One table: a row per (kind, impl), a column per E, then (ratios) each E against the smallest E."""
    experts = sorted({r["experts"] for r in rows})
    e0 = experts[0]
    later = experts[1:] if ratios else []
    head = [title] + [f"E={e}" for e in experts] + [f"E={e}/E={e0}" for e in later]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["kind"], r["impl"]) for r in rows))
    for kind, impl in keys:
        vals = {r["experts"]: value(r) for r in rows if (r["kind"], r["impl"]) == (kind, impl)}
        cells = [f"{vals[e]:.2f}" if e in vals else "" for e in experts]
        cells += [f"{vals[e] / vals[e0]:.2f}×" if e in vals and e0 in vals else "" for e in later]
        lines.append(f"| {kind} {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_fields(e: int) -> dict:
    """The tiny preset with E routed experts, greedy top-4 (the whole-model benchmarks)."""
    return dict(n_routed_experts=e, num_experts_per_tok=4, topk_method="greedy", n_group=1, topk_group=1)


def model_config(e: int) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**model_fields(e))


def speedups(rows: list[dict]) -> list[dict]:
    """transformers' time / ours for every (kind, E) measured on both sides."""
    ours_for = {"transformers": "auto", "transformers+AdamW": "ours", "transformers_decode_only": "engine_decode_only",
                "transformers_eager_generate": "engine_end_to_end"}
    ms = {(r["kind"], r["impl"], r["experts"]): r["ms"] for r in rows}
    return [{"kind": kind, "impl": f"{ours_for[impl]} vs {impl}", "experts": e, "x": t / ms[kind, ours_for[impl], e]}
            for (kind, impl, e), t in ms.items() if impl in ours_for and (kind, ours_for[impl], e) in ms]


DECODE_ROUNDS = 7


def bench_whole_model(experts: list[int], args) -> list[dict]:
    import bench_decode

    rows = train_steps_interleaved(sorted({*experts, 16}), args.reps)  # E=16: the comparison with transformers
    models = {e: init_model(model_config(e)) for e in experts}
    per_token = {e: [] for e in experts}
    # B=1 is ~1 ms a token, nearly all fixed per-step cost, and single rounds spread 0.9-1.9 ms: 3 rounds gave
    # E=64/E=4 anywhere in 1.0-1.7x. DECODE_ROUNDS rotated rounds over E, median per E (min kept in the JSON).
    for r in range(DECODE_ROUNDS):
        for e in experts[r % len(experts):] + experts[:r % len(experts)]:
            per_token[e].append(bench_decode.cache_throughput(models[e], 1, 64, args.new)[0]["s"] / args.new)
    rows += [{"bench": "model", "kind": "decode B=1", "impl": "ours", "experts": e,
              "ms": 1e3 * float(np.median(per_token[e])), "min_ms": 1e3 * min(per_token[e])} for e in experts]
    with tempfile.TemporaryDirectory() as d:
        model, torch_model = bench_decode.tiny_pair(d, model_config(16))
        for r in bench_decode.bench_point(model, torch_model, 8, 200, args.new):
            if r["impl"] in ("engine_decode_only", "transformers_decode_only", "engine_end_to_end",
                             "transformers_eager_generate"):
                rows.append({"bench": "model", "kind": "decode B=8 ctx=200", "impl": r["impl"], "experts": 16,
                             "ms": 1e3 * r["s"] / args.new})
    for r in rows:
        print(f"E={r['experts']:<4} {r['kind']:<20} {r['impl']:<28} {r['ms']:10.2f} ms", flush=True)
    return rows


def train_steps_interleaved(experts: list[int], reps: int) -> list[dict]:
    """The tiny preset's jitted train step (dsv2_jax.train.state.Trainer: AdamW + clipping, state donated; fp32,
    4 × 128 random tokens) for each E, and transformers + torch AdamW at E=16, timed in rounds that visit
    every variant once, so load drift hits all alike (median over rounds). Also the optimizer update alone
    (the same optax transformation, jitted and donated), the part of the step that must grow with the stored
    experts: AdamW reads and writes every stored parameter."""
    import optax
    from bench_train import random_batch
    from dsv2_jax.parallel.sharding import make_mesh, shard_batch
    from dsv2_jax.train.config import TrainConfig
    from dsv2_jax.train.state import Trainer

    steps = {}
    for e in experts:
        tc = TrainConfig.load("tiny").with_overrides(
            ["seq_len=128", "global_batch=4", "compute_dtype=float32"]
            + [f"model.{k}={v}" for k, v in model_fields(e).items()])
        mesh = make_mesh(tc.mesh)
        trainer = Trainer(tc, mesh)
        batch = shard_batch(random_batch(tc, trainer.cfg.vocab_size), mesh)
        box = [trainer.init_state(tc.seed)]

        def step(trainer=trainer, box=box, batch=batch):
            box[0], metrics = trainer.step(box[0], batch)
            jax.block_until_ready(metrics["loss"])

        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), box[0]["params"])
        update = jax.jit(lambda g, o, p, tx=trainer.tx: (lambda u, o: (optax.apply_updates(p, u), o))(
            *tx.update(g, o, p)), donate_argnums=(1, 2))
        opt_box = [jax.tree.map(jnp.copy, (box[0]["opt_state"], box[0]["params"]))]

        def opt_step(update=update, opt_box=opt_box, grads=grads):
            opt, params = opt_box[0]
            params, opt = update(grads, opt, params)
            opt_box[0] = jax.block_until_ready((opt, params))

        steps[("train step", "ours", e)] = step
        steps[("AdamW update alone", "ours", e)] = opt_step
    steps[("train step", "transformers+AdamW", 16)] = torch_train_step(16)
    return [{"bench": "model", "kind": kind, "impl": impl, "experts": e, "ms": ms}
            for (kind, impl, e), ms in interleaved(steps, reps).items()]


def torch_train_step(e: int):
    """One step of transformers' DeepseekV2ForCausalLM + torch AdamW (clip 1.0), same config and batch shape."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = model_config(e)
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**to_hf_dict(cfg))).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 128)))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def goals(rows: list[dict]) -> str:
    """The issue's CPU goals (#10) from this run's rows: value, goal, met."""
    ms = {(r.get("shape", "model"), r["kind"], r["impl"], r["experts"]): r["ms"] for r in rows}
    checks = [("train step (tiny model) E=64 / E=4", ("model", "train step", "ours", 64),
               ("model", "train step", "ours", 4), "≤", 1.3),
              ("decode B=1 (tiny model) E=64 / E=4", ("model", "decode B=1", "ours", 64),
               ("model", "decode B=1", "ours", 4), "≤", 1.3),
              ("train step: transformers + torch AdamW / ours, E=16", ("model", "train step", "transformers+AdamW", 16),
               ("model", "train step", "ours", 16), "≥", 1.5),
              ("decode B=8, 200-token prompts: transformers eager generate / ours end to end, E=16",
               ("model", "decode B=8 ctx=200", "transformers_eager_generate", 16),
               ("model", "decode B=8 ctx=200", "engine_end_to_end", 16), "≥", 2.0),
              ("MoE layer fwd+bwd lite/16 (auto) E=64 / E=4", ("lite/16", "train", "auto", 64),
               ("lite/16", "train", "auto", 4), "≤", 1.3),
              ("MoE layer fwd+bwd lite/16: transformers / ours (auto), E=16", ("lite/16", "train", "transformers", 16),
               ("lite/16", "train", "auto", 16), "≥", 1.0)]
    lines = ["| goal (#10, CPU) | value | target | met |", "|---|---|---|---|"]
    for name, num, den, op, target in checks:
        if num in ms and den in ms:
            v = ms[num] / ms[den]
            met = v <= target if op == "≤" else v >= target
            lines.append(f"| {name} | {v:.2f}× ({ms[num]:.1f} / {ms[den]:.1f} ms) | {op} {target}× | "
                         f"{'yes' if met else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="4,16,64,160")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"MoE-layer shapes, of {sorted(SHAPES)}")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new", type=int, default=64, help="decode steps per whole-model decode measurement")
    ap.add_argument("--whole-model", action="store_true")
    ap.add_argument("--quick", action="store_true", help="E in {4, 64}, 3 reps, 16 new tokens, no dense reference")
    ap.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's). On a loaded "
                    "machine its OpenMP threads wait on each other: 1 thread measured 2-4x faster there")
    ap.add_argument("--out", help="append JSON lines here")
    args = ap.parse_args(argv)
    # The allocator setting a CPU Trainer makes (dsv2_jax/train/host_heap.py), from the start, so the layer benches,
    # the train steps and torch all run under the same one instead of switching at the first Trainer.
    heap = "kept" if jax.default_backend() == "cpu" and keep_freed_heap() else "default"
    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    experts = [int(e) for e in args.experts.split(",")]
    if args.quick:
        experts, args.reps, args.new = [4, 64], 3, 16
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); shapes "
          + "; ".join(f"{n}: {SHAPES[n]}" for n in shapes)
          + f"; torch threads {torch.get_num_threads()}; freed heap {heap}"
          + f"; uptime: {subprocess.getoutput('uptime').strip()}")
    rows, tables = [], []
    for name in shapes:
        got = bench_shape(experts, name, args)
        s = SHAPES[name]
        tables += [markdown([r for r in got if r["kind"] == "train"], lambda r: r["ms"],
                            f"{name} MoE layer fwd+bwd ms ({s['tokens']} tokens, top-{s['topk']}, hidden {s['hidden']},"
                            f" expert width {s['width']}, {s['shared']} shared)"),
                   markdown(speedups(got), lambda r: r["x"], f"{name}: speedup of ours (auto) over transformers",
                            ratios=False)]
        if any(r["kind"].startswith("decode") for r in got):
            tables.append(markdown([r for r in got if r["kind"].startswith("decode")], lambda r: r["ms"],
                                   f"{name} MoE layer decode ms/step"))
        rows += got
        print(f"uptime: {subprocess.getoutput('uptime').strip()}", flush=True)
    if args.whole_model:
        model_rows = bench_whole_model(experts, args)
        tables.append(markdown(model_rows, lambda r: r["ms"], "tiny model, ms (train step / per token)"))
        tables.append(markdown(speedups(model_rows), lambda r: r["x"], "tiny model: speedup over transformers",
                               ratios=False))
        rows += model_rows
    tables.append(goals(rows))
    print("\n\n".join(tables))
    print(f"uptime: {subprocess.getoutput('uptime').strip()}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
