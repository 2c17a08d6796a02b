"""The scheduler's host side without the device: the persistent block tables follow every request's pages through
admissions, prefix sharing, preemption, aborts, stops and retirement, and each step's arrays equal the ones built
row by row from the requests themselves. The jitted step is replaced by a stub returning random tokens (nothing
compiles)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import V2_STYLE
from dsv2_jax.config import ModelConfig
from dsv2_jax.model.transformer import init_model
from dsv2_jax.serve import scheduler as scheduler_mod
from dsv2_jax.serve.paged_cache import TRASH_PAGE
from dsv2_jax.serve.request import Request, SamplingParams
from dsv2_jax.serve.scheduler import Scheduler
from dsv2_jax.serve.step_rows import PENDING, BlockTables, step_arrays


def reference_arrays(rows, prev_slots, n_rows, width, batch_cap):
    """The step's arrays built token row by token row from each request's own page list."""
    packed = np.zeros((4, n_rows), np.int32)
    packed[3] = -1
    tables = np.full((n_rows, width), TRASH_PAGE, np.int32)
    knobs = np.zeros((4, batch_cap), np.int32)
    probs = np.zeros((2, batch_cap), np.float32)
    probs[1] = 1.0
    i = 0
    for j, (r, n) in enumerate(rows):
        for t in range(r.num_cached, r.num_cached + n):
            token = r.tokens[t]
            packed[:, i] = (0, t, 1, prev_slots[id(r)][0]) if token == PENDING else (token, t, 1, -1)
            tables[i, :len(r.pages)] = r.pages
            i += 1
        knobs[:, j] = i - 1, r.params.seed, r.num_generated, r.params.top_k
        probs[:, j] = r.params.temperature, r.params.top_p
    return packed, tables, knobs, probs


def check_tables(sched: Scheduler, reqs: list[Request]) -> None:
    """The incremental table equals the one rebuilt from the requests' pages; free slots hold only the trash page."""
    bt = sched.tables
    holders = [r for r in reqs if r.pages]
    assert all(r.slot >= 0 for r in holders) and all(r.slot == -1 for r in reqs if not r.pages)
    assert len({r.slot for r in holders}) == len(holders)
    want = np.full_like(bt.table, TRASH_PAGE)
    for r in holders:
        want[r.slot, :len(r.pages)] = r.pages
    np.testing.assert_array_equal(bt.table, want)
    assert sorted(bt.free + [r.slot for r in holders]) == list(range(bt.padding))


@pytest.fixture(scope="module")
def model():
    return init_model(ModelConfig.from_hf(dict(V2_STYLE)), seed=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_block_tables_follow_pages_through_random_traffic(model, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    # 7 usable pages of 8 tokens for up to 4 sequences of up to 48 tokens: preemption is frequent; only 1 slot per
    # running sequence to start with, so the slot table has to grow.
    sched = Scheduler(model, page_size=8, num_pages=8, max_running=4, max_tokens_per_step=24, max_prefill_chunk=8,
                      max_model_len=48)
    sched.tables = BlockTables(1, sched.max_pages_per_seq)
    built = []

    def checked_arrays(rows, tables, prev_slots, n_rows, width, batch_cap):
        arrays = step_arrays(rows, tables, prev_slots, n_rows, width, batch_cap)
        for got, want in zip(arrays, reference_arrays(rows, prev_slots, n_rows, width, batch_cap)):
            np.testing.assert_array_equal(got, want)
        assert not np.shares_memory(arrays[1], tables.table)  # a copy: later table edits never reach a dispatched step
        built.append(len(rows))
        return arrays

    monkeypatch.setattr(scheduler_mod, "step_arrays", checked_arrays)
    sched._call = lambda *arrays: rng.integers(3, 12, sched.batch_cap).astype(np.int32)
    shared = [int(t) for t in rng.integers(3, 12, 16)]  # two full pages: prefix sharing
    reqs = []
    for step in range(400):
        if len(reqs) < 40 and rng.random() < 0.5:
            prompt = [int(t) for t in rng.integers(3, 12, int(rng.integers(1, 21)))]
            params = SamplingParams(max_tokens=int(rng.integers(1, 13)), stop_ids=(11,) if rng.random() < 0.3 else ())
            reqs.append(Request(str(len(reqs)), shared + prompt if rng.random() < 0.3 else prompt, params))
            sched.add(reqs[-1])
        if reqs and rng.random() < 0.05:
            sched.abort(reqs[int(rng.integers(len(reqs)))])
        sched.step()
        check_tables(sched, reqs)
        if len(reqs) == 40 and not sched.has_work:
            break
    assert not sched.has_work and sched.pages_in_use == 0 and built
    assert sched.counters["preemptions"] > 0 and sched.counters["prefix_hit_tokens"] > 0
    assert len(sched.tables.table) > 2  # grew
    assert {r.finish_reason for r in reqs} == {"length", "stop", "abort"}
