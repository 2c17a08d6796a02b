"""Continuous batching over the paged latent cache.

Every `step()`:
  1. schedules the running requests oldest first, each getting its next chunk of uncomputed tokens (1 when
     decoding, up to `max_prefill_chunk` when prefilling) within `max_tokens_per_step`; if the pages for a chunk
     cannot be found, the youngest running request is preempted (pages freed, tokens kept, recomputed later);
  2. admits waiting requests into free slots (up to `max_running`) with what budget is left, first sharing any
     cached full-page prefix of their tokens;
  3. dispatches ONE jitted call with every scheduled token as a row (paged_step.py: decode tokens and prefill
     chunks packed, no per-chunk padding), token rows and block-table width bucketed to powers of two, so steady
     state never recompiles; it does not wait for it: a decode row whose input is the previous call's sampled
     token reads it on the device;
  4. only then reads the previous call's sampled tokens back (its device time has hidden this step's host work),
     emits them, retires finished requests and frees their pages (a freed page's next owner writes it in a later
     call: the device runs calls in order). A request that reaches its length leaves the running set at
     dispatch; one that emits a stop id had one more token dispatched, dropped unseen. Filled pages are
     registered with the prefix cache once all their tokens are known on the host.
Not thread-safe: one thread owns a Scheduler (see async_engine.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.infer.jit_model import split_for_jit
from dsv2_jax.model.transformer import DeepseekV2
from dsv2_jax.serve.page_allocator import PageAllocator, page_hashes
from dsv2_jax.serve.paged_cache import PagedLatentCache, pages_for_budget
from dsv2_jax.serve.paged_step import step_and_sample
from dsv2_jax.serve.request import Request
from dsv2_jax.serve.step_rows import PENDING, BlockTables, step_arrays

# Floors of the two bucketed dimensions: below them a step's fixed cost dominates, and every bucket is a compilation.
MIN_ROW_BUCKET = 8
MIN_TABLE_BUCKET = 2


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    return min(max(1 << max(n - 1, 0).bit_length(), floor), cap)


def _arrival(req: Request) -> float:
    return req.arrival


@dataclass
class _InFlight:
    tokens: jax.Array                                   # [batch_cap] sampled tokens of a dispatched call
    slots: dict[int, tuple[int, int, Request]]          # id(request) -> (row in tokens, index in request.tokens, it)


@dataclass
class StepOutput:
    request: Request
    token: int | None      # the token sampled this step, if any
    finished: bool


class Scheduler:
    """Holds the model's split state, the page pool and the request queues.

    page_size: tokens per page. num_pages (trash page included) or cache_memory_bytes sizes the pool (default
    256 MiB). max_running: concurrent sequences. max_tokens_per_step: tokens computed per step, all rows.
    max_prefill_chunk: longest prefill chunk of one request (default max_tokens_per_step). max_prefill_tokens: prefill
    tokens in a step that also decodes (default max_tokens_per_step), rounded up to fill the step's row bucket: the
    bound on the prefill work a running stream's next token waits for (TPOT). max_model_len: prompt +
    output limit (default the model's max_position_embeddings, capped by the pool). cache_sharding places the pool
    (replicated on a mesh).
    """

    def __init__(self, model: DeepseekV2, *, page_size: int = 64, num_pages: int | None = None,
                 cache_memory_bytes: int = 256 << 20, max_running: int = 16, max_tokens_per_step: int = 256,
                 max_prefill_chunk: int | None = None, max_prefill_tokens: int | None = None,
                 max_model_len: int | None = None, cache_dtype=jnp.bfloat16, cache_sharding=None):
        cfg = self.config = model.config
        self.model_def, self.weights = split_for_jit(model)
        if num_pages is None:
            num_pages = pages_for_budget(cfg, page_size, cache_dtype, cache_memory_bytes)
        if max_prefill_tokens is None:
            max_prefill_tokens = max_tokens_per_step
        for name, v in (("page_size", page_size), ("max_running", max_running),
                        ("max_tokens_per_step", max_tokens_per_step), ("max_prefill_tokens", max_prefill_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.cache = PagedLatentCache.zeros(cfg, num_pages, page_size, cache_dtype, cache_sharding)
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_running = max_running
        self.max_tokens_per_step = max_tokens_per_step
        self.max_prefill_chunk = min(max_prefill_chunk or max_tokens_per_step, max_tokens_per_step)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, self.allocator.capacity * page_size)
        self.max_pages_per_seq = math.ceil(self.max_model_len / page_size)
        self.tables = BlockTables(2 * max_running, self.max_pages_per_seq)  # running + retiring in flight
        self.batch_cap = _bucket(max_running, 1 << 30)
        self.token_cap = _bucket(max_tokens_per_step, 1 << 30)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = dict(steps=0, generated_tokens=0, computed_tokens=0, prefix_hit_tokens=0, preemptions=0)
        # Wall seconds per step phase, summed: schedule (Python planning), prepare (host arrays), dispatch (the
        # jitted call returning, transfers included), wait (blocked on the previous call's tokens), finish
        # (bookkeeping, retiring, prefix registration);
        # steps that carried prefill tokens, tokens computed (prefill among them) and the token rows (bucketed)
        # computed for them.
        self.timings = dict(schedule_s=0.0, prepare_s=0.0, dispatch_s=0.0, wait_s=0.0, finish_s=0.0,
                            prefill_steps=0, tokens=0, prefill_tokens=0, rows=0)
        self._inflight: _InFlight | None = None
        self._no_tokens = jnp.zeros(self.batch_cap, jnp.int32)

    # ---- queue API ----------------------------------------------------------------------------------
    def validate(self, prompt: list[int], max_tokens: int) -> None:
        """Raises ValueError (one line) for a request this server can never run."""
        if not prompt:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the maximum "
                             f"length {self.max_model_len}")

    def add(self, request: Request) -> None:
        self.validate(request.prompt, request.params.max_tokens)
        self.waiting.append(request)

    def abort(self, request: Request) -> None:
        """Drops a request wherever it is and frees its pages now."""
        if request.finished:
            return
        request.finish_reason = "abort"
        while request.num_generated and request.tokens[-1] == PENDING:  # never read back: not part of its output
            request.tokens.pop()
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self._free(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    @property
    def pages_in_use(self) -> int:
        return self.allocator.num_in_use

    # ---- paging -------------------------------------------------------------------------------------
    def _free(self, req: Request) -> None:
        self.allocator.release(req.pages)
        self.tables.clear(req)
        req.pages, req.hashes, req.num_registered, req.num_cached = [], [], 0, 0

    def _reserve(self, req: Request, n_tokens: int) -> bool:
        need = math.ceil(n_tokens / self.page_size) - len(req.pages)
        if need <= 0:
            return True
        pages = self.allocator.allocate(need)
        if pages is None:
            return False
        req.pages += pages
        self.tables.extend(req, pages)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(req)

    def _share_prefix(self, req: Request) -> None:
        """Starts req from the longest cached run of its full pages (at least one token is left to compute)."""
        usable = (len(req.tokens) - 1) // self.page_size
        hashes = page_hashes(req.tokens[:usable * self.page_size], self.page_size)
        pages = self.allocator.match_prefix(hashes)
        req.pages, req.hashes = pages, hashes[:len(pages)]
        self.tables.extend(req, pages)
        req.num_cached, req.num_registered = len(pages) * self.page_size, len(pages)
        self.counters["prefix_hit_tokens"] += req.num_cached

    def _register_full_pages(self, req: Request) -> None:
        if req.num_cached // self.page_size <= req.num_registered:  # no page filled since the last call
            return
        known = req.num_cached  # computed tokens whose values the host has (a PENDING one is hashed once read back)
        while known and req.tokens[known - 1] == PENDING:
            known -= 1
        full = known // self.page_size
        if full > len(req.hashes):
            req.hashes += page_hashes(req.tokens[:full * self.page_size], self.page_size, start=len(req.hashes),
                                      prev=req.hashes[-1] if req.hashes else b"")
        for k in range(req.num_registered, full):
            self.allocator.register(req.pages[k], req.hashes[k])
        req.num_registered = max(req.num_registered, full)

    # ---- one step -----------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        running = self.running
        running.sort(key=_arrival)
        # Token budget: every decoding stream first (a long prompt never stalls them), then prefill chunks, oldest
        # first; then pages for the plan, oldest first, preempting the youngest when the pool runs dry.
        todo = [len(r.tokens) - r.num_cached for r in running]
        plan = [0] * len(running)  # tokens per running request, aligned with `running`
        decoding = 0
        for i, t in enumerate(todo):
            if t == 1 and decoding < self.max_tokens_per_step:
                plan[i], decoding = 1, decoding + 1
        is_decode = list(plan)
        # A step that decodes carries max_prefill_tokens of prefill (what a stream's next token waits for), rounded
        # up to fill the row bucket the step is padded to anyway (a padding row costs what a token row does).
        prefill_cap = self.max_tokens_per_step
        if decoding:
            prefill_cap = _bucket(decoding + self.max_prefill_tokens, self.token_cap, MIN_ROW_BUCKET) - decoding
        budget = min(self.max_tokens_per_step - decoding, prefill_cap)
        for i, t in enumerate(todo):
            if budget <= 0:
                break
            if not plan[i]:
                plan[i] = min(t, budget, self.max_prefill_chunk)
                budget -= plan[i]
        rows: list[tuple[Request, int]] = []
        preempted = False
        scheduled = prefill = 0
        i = 0
        while i < len(running):
            req, n = running[i], plan[i]
            if n and not self._reserve(req, req.num_cached + n):
                self._preempt(running[-1])  # sorted by arrival: the youngest
                plan.pop()
                preempted = True
                if i == len(running):  # the victim was req itself
                    break
                continue
            if n:
                rows.append((req, n))
                scheduled += n
                prefill += n - is_decode[i]
            i += 1
        budget = min(self.max_tokens_per_step - scheduled, prefill_cap - prefill)
        while self.waiting and not preempted and len(self.running) < self.max_running and budget > 0:
            req = self.waiting[0]
            self._share_prefix(req)
            n = min(len(req.tokens) - req.num_cached, budget, self.max_prefill_chunk)
            if not self._reserve(req, req.num_cached + n):
                self._free(req)
                break
            self.waiting.popleft()
            self.running.append(req)
            rows.append((req, n))
            budget -= n
        return rows

    def _launch(self, rows: list[tuple[Request, int]]) -> _InFlight:
        """Dispatches the step's one jitted call without waiting for it — row j's n tokens are n consecutive token
        rows; a decoding row whose token is still on the device reads it from the previous call's output — then
        applies what does not depend on the sampled tokens: progress, a PENDING token per sampled request, and
        taking the requests that reach their length out of the running set."""
        t0 = time.perf_counter()
        total = sum(n for _, n in rows)
        n_rows = _bucket(total, self.token_cap, MIN_ROW_BUCKET)
        width = self._width(max(math.ceil((r.num_cached + n) / self.page_size) for r, n in rows))
        prev = self._inflight or _InFlight(self._no_tokens, {})
        arrays = step_arrays(rows, self.tables, prev.slots, n_rows, width, self.batch_cap)
        t1 = time.perf_counter()
        sampled = self._call(prev.tokens, *arrays)
        t2 = time.perf_counter()
        slots = {}
        self.counters["computed_tokens"] += total
        for j, (r, n) in enumerate(rows):
            r.num_cached += n
            self._register_full_pages(r)
            if r.num_cached < len(r.tokens):  # a prefill chunk short of the end: nothing sampled
                continue
            r.tokens.append(PENDING)
            slots[id(r)] = (j, len(r.tokens) - 1, r)
            if r.num_generated >= r.params.max_tokens or len(r.tokens) >= self.max_model_len:
                self.running.remove(r)  # done: retired when its token is read back (its pages kept till then)
        tm = self.timings
        tm["prepare_s"] += t1 - t0
        tm["dispatch_s"] += t2 - t1
        tm["finish_s"] += time.perf_counter() - t2
        prefill = sum(n for r, n in rows if n > 1 or r.num_generated <= 1)  # decoding: 1 row after a sample
        tm["prefill_steps"] += prefill > 0
        tm["tokens"] += total
        tm["prefill_tokens"] += prefill
        tm["rows"] += n_rows
        return _InFlight(sampled, slots)

    def _resolve(self, flight: _InFlight) -> list[StepOutput]:
        """Reads a dispatched call's sampled tokens back: fills each request's PENDING token, finishes requests
        that emitted a stop id (dropping anything scheduled after it) or reached their length."""
        t0 = time.perf_counter()
        sampled = np.asarray(flight.tokens).tolist()
        t1 = time.perf_counter()
        outputs = []
        for j, k, req in flight.slots.values():
            if req.finished:  # aborted meanwhile, or stopped one call earlier (this token was dropped unseen)
                continue
            token = req.tokens[k] = sampled[j]
            if token in req.params.stop_ids:
                req.finish_reason = "stop"
                del req.tokens[k + 1:]  # a token dispatched after the stop: never emitted
            elif k + 1 - len(req.prompt) >= req.params.max_tokens or k + 1 >= self.max_model_len:
                req.finish_reason = "length"
            self._register_full_pages(req)  # a page this token completed; before any free, so it stays cached
            if req.finished:
                self._retire(req)
            outputs.append(StepOutput(req, token, req.finished))
        self.counters["generated_tokens"] += len(outputs)
        self.timings["wait_s"] += t1 - t0
        self.timings["finish_s"] += time.perf_counter() - t1
        return outputs

    def _retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(req)
        self._free(req)

    def _call(self, *arrays):
        out, self.cache = step_and_sample(self.model_def, self.weights, self.cache, *arrays)
        return out

    def _width(self, pages: int) -> int:
        """Block-table width for a step whose longest sequence spans `pages` pages: powers of two from
        MIN_TABLE_BUCKET, plus 3/4 of each from 8 up (6, 12, 24, ...: every row gathers and attends over the
        width, so 5 pages pad to 6, not 8); at most max_pages_per_seq."""
        w = _bucket(pages, 1 << 30, MIN_TABLE_BUCKET)
        if w >= 8 and 4 * pages <= 3 * w:
            w = 3 * w // 4
        return min(w, self.max_pages_per_seq)

    def bucket_shapes(self) -> list[tuple[int, int]]:
        """Every (token rows, block-table width) a step can use: all that steady state ever compiles."""
        rows = sorted({_bucket(n, self.token_cap, MIN_ROW_BUCKET) for n in range(1, self.max_tokens_per_step + 1)})
        widths = sorted({self._width(n) for n in range(1, self.max_pages_per_seq + 1)})
        return [(n, w) for n in rows for w in widths]

    def warmup(self) -> int:
        """Compiles every bucket shape up front with all-padding steps (they write only the trash page), so no
        request ever waits for a compilation. Returns the number of shapes."""
        shapes = self.bucket_shapes()
        for n, w in shapes:
            out = self._call(self._no_tokens, np.zeros((4, n), np.int32), np.zeros((n, w), np.int32),
                             np.zeros((4, self.batch_cap), np.int32), np.ones((2, self.batch_cap), np.float32))
        out.block_until_ready()
        return len(shapes)

    def step(self) -> list[StepOutput]:
        """Schedules and dispatches the next call, then returns the tokens of the call before it: the host's
        scheduling of one step runs while the device computes the previous one (sglang's overlap scheduler)."""
        t0 = time.perf_counter()
        rows = self._schedule()
        self.timings["schedule_s"] += time.perf_counter() - t0
        flight, self._inflight = self._inflight, (self._launch(rows) if rows else None)
        if rows:
            self.counters["steps"] += 1
        return self._resolve(flight) if flight else []

    def run_to_completion(self, requests: list[Request]) -> dict[str, list[int]]:
        """Offline helper: adds all requests, steps until done; returns {id: new tokens}."""
        for r in requests:
            self.add(r)
        while self.has_work:
            self.step()
        return {r.id: r.output for r in requests}


def compiled_shapes() -> int:
    """How many shapes the shared jitted step has compiled (tests: steady state adds none)."""
    return step_and_sample._cache_size()

