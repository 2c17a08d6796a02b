"""Validation of generation arguments (API and CLI alike): a bad value is one clear ValueError naming it, never a
traceback from deep inside jit (an int32 overflow, a float range())."""

from __future__ import annotations

import math
import numbers

SEED_LIMIT = 2**32  # jax.random.key keeps 32 bits without x64: larger seeds would silently collide


def check_count(name: str, value, low: int, high: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_max_new_tokens(max_new_tokens) -> int:
    return check_count("max_new_tokens", max_new_tokens, 1)


def check_sampling(temperature, top_k, top_p, seed, vocab_size: int) -> tuple[float, int, float, int]:
    """(temperature, top_k, top_p, seed) as the sampler takes them: top_k 0 = off (values above the vocabulary
    keep every token, as in transformers), top_p 1 = off."""
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    k = 0 if top_k is None else min(check_count("top_k", top_k, 0), vocab_size)
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return float(temperature), k, 1.0 if top_p is None else float(top_p), check_count("seed", seed, 0, SEED_LIMIT)
