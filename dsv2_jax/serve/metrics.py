"""Prometheus metrics of the serving engine (its own registry, text exposition format)."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("dsv2_requests_running", "Requests holding a batch slot", registry=r)
        self.waiting = Gauge("dsv2_requests_waiting", "Requests queued for a slot", registry=r)
        self.pages_used = Gauge("dsv2_cache_pages_used", "Latent-cache pages referenced by requests", registry=r)
        self.pages_total = Gauge("dsv2_cache_pages_total", "Latent-cache pages in the pool", registry=r)
        self.page_usage = Gauge("dsv2_cache_usage_ratio", "Fraction of the page pool in use", registry=r)
        self.tokens_per_s = Gauge("dsv2_generation_tokens_per_second", f"Tokens generated per second over the last "
                                  f"{RATE_WINDOW_S:g} s", registry=r)
        self.generated = Counter("dsv2_generation_tokens", "Tokens generated", registry=r)
        self.computed = Counter("dsv2_computed_tokens", "Tokens run through the model (prefill + decode)",
                                registry=r)
        self.prefix_hits = Counter("dsv2_prefix_cache_hit_tokens", "Prompt tokens served from shared pages",
                                   registry=r)
        self.preemptions = Counter("dsv2_preemptions", "Requests preempted for lack of pages", registry=r)
        self.finished = Counter("dsv2_requests_finished", "Finished requests", ["reason"], registry=r)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("dsv2_time_per_output_token_seconds", "Interval between a request's tokens",
                              buckets=LATENCY_BUCKETS, registry=r)
        self._last_counters: dict[str, int] = {}
        self._last_token: dict[str, float] = {}
        self._window: deque = deque()  # (time, tokens generated that step)

    def observe_step(self, sched, outputs, now: float, step_s: float) -> None:
        """Called by the engine thread after each step."""
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.pages_used.set(sched.pages_in_use)
        self.pages_total.set(sched.allocator.capacity)
        self.page_usage.set(sched.pages_in_use / sched.allocator.capacity)
        for name, metric in (("generated_tokens", self.generated), ("computed_tokens", self.computed),
                             ("prefix_hit_tokens", self.prefix_hits), ("preemptions", self.preemptions)):
            value = sched.counters[name]
            metric.inc(value - self._last_counters.get(name, 0))
            self._last_counters[name] = value
        for out in outputs:
            req = out.request
            last = self._last_token.get(req.id)
            if last is None:
                req.first_token_time = now
                self.ttft.observe(now - req.arrival)
            else:
                self.tpot.observe(now - last)
            self._last_token[req.id] = now
            if out.finished:
                self._last_token.pop(req.id, None)
        self._window.append((now, len(outputs)))
        while self._window and self._window[0][0] < now - RATE_WINDOW_S:
            self._window.popleft()
        span = max(now - self._window[0][0], step_s) if self._window else 0.0
        self.tokens_per_s.set(sum(n for _, n in self._window) / span if span > 0 else 0.0)

    def request_finished(self, reason: str, request_id: str) -> None:
        self.finished.labels(reason=reason).inc()
        self._last_token.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
