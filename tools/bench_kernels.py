"""Benchmark the MLA Pallas kernels against the pure-JAX (XLA) references.

Decode: effective HBM bandwidth (latent-cache bytes read / time) and speedup
over the reference. Prefill: TFLOP/s of the forward and of forward+backward
(GPU: tokamax's Mosaic GPU flash attention, as dsv2_jax.ops.attention_backend uses).
Prints a table; --out appends one JSON object per row. `--small` runs tiny
shapes (in Pallas interpret mode on CPU) so the script is exercised in CI.

  python tools/bench_kernels.py --small
  python tools/bench_kernels.py --which decode --out /tmp/bench.jsonl
"""

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp

from dsv2_jax.ops.attention_backend import tokamax_attention
from kernels_pallas import default_backend, flash_mla_attention, mla_decode
from kernels_pallas.reference import mla_attention_reference, mla_decode_reference

C, R, DQK, DV = 512, 64, 192, 128


def timeit(fn, args, warmup, iters):
    """Mean seconds per call of a jitted fn, after compile + warmup runs."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def bench_decode(b, h, t, backend, dtype, warmup, iters, c=C, r=R):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    args = (
        _normal(ks[0], (b, h, c), dtype),
        _normal(ks[1], (b, h, r), dtype),
        _normal(ks[2], (b, t, c), dtype),
        _normal(ks[3], (b, t, r), dtype),
        jnp.full((b,), t, jnp.int32),
    )
    scale = (DQK) ** -0.5
    kern = jax.jit(lambda *a: mla_decode(*a, scale=scale, backend=backend))
    ref = jax.jit(lambda *a: mla_decode_reference(*a, scale=scale))
    t_k, t_x = timeit(kern, args, warmup, iters), timeit(ref, args, warmup, iters)
    cache_bytes = b * t * (c + r) * jnp.dtype(dtype).itemsize
    return dict(
        kernel="decode",
        B=b,
        H=h,
        T=t,
        C=c,
        R=r,
        ms=t_k * 1e3,
        xla_ms=t_x * 1e3,
        GBps=cache_bytes / t_k / 1e9,
        xla_GBps=cache_bytes / t_x / 1e9,
        speedup=t_x / t_k,
    )


def _flash(q, k, v, scale, backend):
    """The training/prefill flash core attention_backend picks: tokamax's Mosaic GPU kernel on GPU, ours else."""
    if backend == "mosaic_gpu":
        return tokamax_attention(q, k, v, None, scale)
    return flash_mla_attention(q, k, v, scale=scale, backend=backend)


def bench_prefill(b, h, t, backend, dtype, warmup, iters, dqk=DQK, dv=DV):
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k = _normal(ks[0], (b, t, h, dqk), dtype), _normal(ks[1], (b, t, h, dqk), dtype)
    v, do = _normal(ks[2], (b, t, h, dv), dtype), _normal(ks[3], (b, t, h, dv), dtype)
    scale = dqk**-0.5
    fns = {
        "kernel": lambda q, k, v: _flash(q, k, v, scale, backend),
        "xla": lambda q, k, v: mla_attention_reference(q, k, v, scale=scale),
    }
    # Causal: half of the T x T score matrix. Backward = recompute S, dP, dV, dK, dQ.
    flops_fwd = 2 * b * h * t * t * (dqk + dv) / 2
    flops_bwd = 2 * b * h * t * t * (3 * dqk + 2 * dv) / 2
    row = dict(kernel="prefill", B=b, H=h, T=t, Dqk=dqk, Dv=dv)
    for name, f in fns.items():
        fwd = jax.jit(f)
        loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) * do)
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        t_f = timeit(fwd, (q, k, v), warmup, iters)
        t_fb = timeit(fwd_bwd, (q, k, v), warmup, iters)
        pre = "" if name == "kernel" else "xla_"
        row |= {
            f"{pre}fwd_ms": t_f * 1e3,
            f"{pre}fwd_TFLOPs": flops_fwd / t_f / 1e12,
            f"{pre}fwdbwd_ms": t_fb * 1e3,
            f"{pre}fwdbwd_TFLOPs": (flops_fwd + flops_bwd) / t_fb / 1e12,
        }
    row["speedup_fwd"] = row["xla_fwd_ms"] / row["fwd_ms"]
    row["speedup_fwdbwd"] = row["xla_fwdbwd_ms"] / row["fwdbwd_ms"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", choices=["decode", "prefill", "all"], default="all")
    p.add_argument("--backend", default="auto", help="kernel backend; on CPU 'auto' means interpret")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--quick", action="store_true", help="fewer decode shapes (device_check.sh)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="append JSON lines here")
    a = p.parse_args()
    backend = a.backend
    if backend == "auto":
        backend = default_backend()
        backend = "interpret" if backend == "xla" else backend
    dtype = jnp.bfloat16
    if a.small:
        decode_cfgs = [dict(b=2, h=16, t=100, c=64, r=16)]
        prefill_cfgs = [dict(b=1, h=2, t=64, dqk=24, dv=16)]
        a.warmup, a.iters = 1, 2
    else:
        decode_cfgs = [dict(b=b, h=h, t=t) for h, b, t in itertools.product((128, 16), (1, 8, 64), (1024, 4096, 16384))]
        if a.quick:  # the curve over context at the serving batch, and the batch extremes at long context
            decode_cfgs = [c for c in decode_cfgs if c["b"] == 8 or c["t"] == 16384]
        # Bounded by the XLA reference, which materialises [B, H, T, T] fp32 scores.
        prefill_cfgs = [
            dict(b=1, h=128, t=2048),
            dict(b=4, h=16, t=2048),
            dict(b=2, h=16, t=4096),
            dict(b=1, h=16, t=8192),
        ]
    print(f"device={jax.devices()[0].device_kind} backend={backend}")
    jobs = []
    if a.which in ("decode", "all"):
        jobs += [(bench_decode, cfg) for cfg in decode_cfgs]
    if a.which in ("prefill", "all"):
        jobs += [(bench_prefill, cfg) for cfg in prefill_cfgs]
    for fn, cfg in jobs:
        try:
            row = fn(**cfg, backend=backend, dtype=dtype, warmup=a.warmup, iters=a.iters)
        except Exception as e:  # e.g. OOM of the reference at one shape: keep going
            row = dict(kernel=fn.__name__, **cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
        row |= dict(backend=backend, device=jax.devices()[0].device_kind)
        print(
            "  ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k not in ("backend", "device")
            ),
            flush=True,
        )
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
