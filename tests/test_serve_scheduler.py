"""Continuous batching over the paged latent cache: greedy tokens equal offline generation, request by request,
through shared prefixes, chunked prefill, preemption and cancellation; pages always return to the pool."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import V2_STYLE
from dsv2_jax.config import ModelConfig
from dsv2_jax.infer.engine import DecodeEngine
from dsv2_jax.model.transformer import init_model
from dsv2_jax.serve.page_allocator import PageAllocator, page_hashes
from dsv2_jax.serve.request import Request, SamplingParams
from dsv2_jax.serve.scheduler import Scheduler, compiled_shapes

PAGE = 16
KNOBS = dict(page_size=PAGE, max_running=4, max_tokens_per_step=24, max_prefill_chunk=16, max_model_len=64,
             cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def model():
    return init_model(ModelConfig.from_hf(dict(V2_STYLE)), seed=0, std=0.15)


def workload(seed=0, n=24):
    """Mixed prompt (3..44) and output (2..14) lengths; every 4th prompt extends one shared 2-page prefix."""
    rng = np.random.default_rng(seed)
    shared = [int(t) for t in rng.integers(3, 150, 2 * PAGE)]
    out = []
    for i in range(n):
        tail = [int(t) for t in rng.integers(3, 150, int(rng.integers(3, 13 if i % 4 == 0 else 45)))]
        out.append((shared + tail if i % 4 == 0 else tail, int(rng.integers(2, 15))))
    return out


@pytest.fixture(scope="module")
def offline(model):
    """Each prompt decoded alone by the static engine (fixed max_len: one decode compilation)."""
    engine = DecodeEngine(model, max_len=64, cache_dtype=jnp.float32)
    return [engine.generate([p], n)[0] for p, n in workload()]


def run(scheduler, work, cancel=()):
    """Adds every request at once; cancels those in `cancel` once they have 2 tokens. Bounded loop."""
    reqs = [Request(str(i), p, SamplingParams(max_tokens=n)) for i, (p, n) in enumerate(work)]
    for r in reqs:
        scheduler.add(r)
    for _ in range(2000):
        if not scheduler.has_work:
            break
        scheduler.step()
        for i in cancel:
            if reqs[i].num_generated >= 2:
                scheduler.abort(reqs[i])
    assert not scheduler.has_work
    return reqs


def test_continuous_batching_matches_offline(model, offline):
    # 11 usable pages: four running sequences of up to 4 pages do not fit, so the youngest gets preempted.
    sched = Scheduler(model, num_pages=12, **KNOBS)
    assert sched.warmup() == 3 * 2  # token rows 8/16/32 x table widths 2/4 pages
    compiled = compiled_shapes()
    pool = sched.cache.ckv[0]
    cancel = (5, 11, 17)
    reqs = run(sched, workload(), cancel)
    assert pool.is_deleted()  # the pool is donated to each step, so XLA may update it in place
    assert compiled_shapes() == compiled  # steady state from the first request: nothing recompiles
    for i, r in enumerate(reqs):
        if i in cancel:
            assert r.finish_reason == "abort" and r.output == offline[i][:len(r.output)]
        else:
            assert r.finish_reason == "length" and r.output == offline[i], f"request {i}"
    assert sched.pages_in_use == 0
    assert sched.counters["preemptions"] > 0 and sched.counters["prefix_hit_tokens"] >= 2 * PAGE


def test_stop_ids_and_sampling_match_offline(model, offline):
    p, _ = workload()[1]
    stop = offline[1][2]
    sched = Scheduler(model, num_pages=12, **KNOBS)
    r2 = Request("s", p, SamplingParams(max_tokens=10, stop_ids=(stop,)))
    sched.add(r2)
    while sched.has_work:
        sched.step()
    assert r2.finish_reason == "stop" and r2.output == offline[1][:offline[1].index(stop) + 1]
    # Seeded sampling depends only on (seed, token index): equal to the static engine on the prompt alone.
    engine = DecodeEngine(model, max_len=64, cache_dtype=jnp.float32)
    want = engine.generate([p], 6, temperature=0.8, top_p=0.9, seed=7)[0]
    r3 = Request("t", p, SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7))
    sched.add(r3)
    while sched.has_work:
        sched.step()
    assert r3.output == want and sched.pages_in_use == 0


def test_generated_tokens_join_the_prefix_cache(model, offline):
    """A follow-up turn (prompt + answer + more) reuses the page the answer completed: its last token was still on
    the device when the page's latents were dispatched, and is hashed once read back."""
    p, n = workload()[1]  # 15 prompt tokens + 14 generated: page 0 ends with the first generated token
    sched = Scheduler(model, num_pages=12, **KNOBS)
    assert sched.run_to_completion([Request("a", p, SamplingParams(max_tokens=n))])["a"] == offline[1]
    sched.run_to_completion([Request("b", p + offline[1] + [5, 6, 7], SamplingParams(max_tokens=2))])
    assert sched.counters["prefix_hit_tokens"] == PAGE and sched.pages_in_use == 0


def test_allocator_prefix_sharing_and_eviction():
    alloc = PageAllocator(5)  # page 0 is the trash page: 4 usable
    toks = list(range(3 * 4))
    hashes = page_hashes(toks, 4)
    a = alloc.allocate(3)
    for p, h in zip(a, hashes):
        alloc.register(p, h)
    assert alloc.match_prefix(page_hashes(toks[:8] + [99] * 4, 4)) == a[:2]  # diverges in the 3rd page
    assert alloc.refs[a[0]] == 2 and alloc.num_in_use == 3
    alloc.release(a[:2])
    alloc.release(a)
    assert alloc.num_in_use == 0 and alloc.num_available == 4
    assert alloc.allocate(4) is not None  # evicts the cached pages once the free list is empty
    assert alloc.match_prefix(hashes) == [] and alloc.allocate(1) is None


def test_pallas_paged_kernel_engine_equals_xla(offline):
    """The same traffic with the interpreted Pallas paged-decode kernel gives the xla path's tokens."""
    cfg = dataclasses.replace(ModelConfig.from_hf(dict(V2_STYLE)), attention_impl="pallas")
    sched = Scheduler(init_model(cfg, seed=0, std=0.15), num_pages=12, **dict(KNOBS, max_running=1))
    reqs = run(sched, workload()[1:3])  # prompts of 15 (one chunk) and 36 tokens (three), then 14 and 13 decodes
    assert [r.output for r in reqs] == offline[1:3] and sched.pages_in_use == 0


def test_prefill_cap_in_decoding_steps_matches_offline(model, offline):
    """max_prefill_tokens: a step that decodes carries that many prefill tokens, rounded up to fill its row bucket
    (>= 8 rows); an idle engine prefills a full step. Outputs unchanged, pages returned."""
    sched = Scheduler(model, num_pages=12, max_prefill_tokens=6, **KNOBS)
    plan = sched._schedule
    cap = {d: (8 if d + 6 <= 8 else 16) - d for d in range(1, 5)}  # max_running 4
    seen = []

    def checked():
        decoding = {id(r) for r in sched.running if len(r.tokens) - r.num_cached == 1}
        rows = plan()
        prefill = sum(n for r, n in rows if id(r) not in decoding)
        assert prefill <= (cap[len(decoding)] if decoding else KNOBS["max_tokens_per_step"])
        seen.append((len(decoding), prefill))
        return rows

    sched._schedule = checked
    sched.warmup()
    compiled = compiled_shapes()
    reqs = run(sched, workload()[:8])
    assert [r.output for r in reqs] == offline[:8] and sched.pages_in_use == 0
    assert compiled_shapes() == compiled  # the same bucket shapes: nothing recompiles
    assert any(d and p == cap[d] for d, p in seen), seen  # the cap binds (24 - d would be allowed without it)
    assert max(p for d, p in seen if not d) > 8  # an idle engine is not capped
