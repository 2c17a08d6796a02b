"""Batched generation: jitted prefill + per-token decode over a donated latent cache, with sampling and EOS.

The compiled functions are module-level and take the model's interned `ModelDef` as a static argument
(jit_model.py), so every engine over the same architecture shares them; shapes are fixed per (batch, prompt
bucket, max_len), so decoding never recompiles per token. Prompt lengths are bucketed to powers of two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.infer.decode import decode_step, prefill
from dsv2_jax.infer.jit_model import split_for_jit
from dsv2_jax.infer.latent_cache import LatentCache
from dsv2_jax.model.transformer import DeepseekV2
from dsv2_jax.infer.sampling import sample
from dsv2_jax.infer.sampling_args import check_count, check_max_new_tokens, check_sampling

MIN_BUCKET = 16


def _prefill_and_sample(model_def, weights, cache, tokens, lengths, key, temperature, top_k, top_p):
    logits, cache = prefill(model_def.merge(weights), cache, tokens, lengths)
    return sample(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p), logits, cache


def _decode_and_sample(model_def, weights, cache, tokens, key, step, temperature, top_k, top_p):
    logits, cache = decode_step(model_def.merge(weights), cache, tokens)
    return sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p), logits, cache


# (model_def, weights, cache, ...) -> (next tokens [B], their logits [B, V], cache); the cache is donated.
# model_def, weights: `split_for_jit(model)` (a per-call GraphDef hash would cost more than a tiny decode step).
prefill_and_sample = jax.jit(_prefill_and_sample, static_argnums=0, donate_argnums=2)
decode_and_sample = jax.jit(_decode_and_sample, static_argnums=0, donate_argnums=2)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class DecodeStats:
    batch: int = 0
    prompt_bucket: int = 0
    max_len: int = 0
    cache_nbytes: int = 0
    new_tokens: int = 0       # tokens emitted (EOS included), all sequences
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: emitted tokens after the first, over the time spent in decode steps."""
        return (self.new_tokens - self.batch) / self.decode_s if self.decode_s > 0 else 0.0


class DecodeEngine:
    """Holds a model's split state; `generate` / `stream` run batches of prompts through the latent cache.

    max_len: fixed cache length (tokens per sequence); None sizes it per call to the next power of two of the
    longest prompt + max_new_tokens, capped at max_position_embeddings. cache_dtype defaults to bfloat16.
    """

    def __init__(self, model: DeepseekV2, max_len: int | None = None, cache_dtype=jnp.bfloat16):
        self.config = model.config
        self.model_def, self.weights = split_for_jit(model)
        if max_len is not None and check_count("max_len", max_len, 1) > self.config.max_position_embeddings:
            # positions past max_position_embeddings are outside what the model (and its RoPE scaling) covers
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        self.max_len = max_len
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.stats = DecodeStats()

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the latent cache used by the last call."""
        return self.stats.cache_nbytes

    @property
    def tokens_per_s(self) -> float:
        return self.stats.tokens_per_s

    def _check(self, prompts, max_new_tokens: int) -> int:
        """Validates the batch; returns the cache length to use."""
        cfg = self.config
        check_max_new_tokens(max_new_tokens)
        if not prompts:
            raise ValueError("no prompts given")
        limit = self.max_len or cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                                 f"maximum length {limit}")
        longest = max(len(p) for p in prompts)
        return self.max_len or min(_next_pow2(longest + max_new_tokens), cfg.max_position_embeddings)

    def batch(self, prompts: list[list[int]], max_new_tokens: int):
        """Validated, right-padded prompt batch: (tokens [B, bucket], lengths [B], empty cache [B, max_len])."""
        max_len = self._check(prompts, max_new_tokens)
        bucket = min(max(_next_pow2(max(len(p) for p in prompts)), MIN_BUCKET), max_len)
        tokens = np.zeros((len(prompts), bucket), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        return jnp.asarray(tokens), lengths, LatentCache.zeros(self.config, len(prompts), max_len, self.cache_dtype)

    def stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               eos_id: int | None = None) -> Iterator[list[int | None]]:
        """Yields, per step, each sequence's new token (None once it has finished with eos_id)."""
        temperature, top_k, top_p, seed = check_sampling(temperature, top_k, top_p, seed, self.config.vocab_size)
        tokens, lengths, cache = self.batch(prompts, max_new_tokens)
        b = len(prompts)
        knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        key = jax.random.key(seed)
        self.stats = DecodeStats(batch=b, prompt_bucket=tokens.shape[1], max_len=cache.max_len,
                                 cache_nbytes=cache.nbytes)

        t0 = time.perf_counter()
        tok, _, cache = prefill_and_sample(self.model_def, self.weights, cache, tokens, lengths, key, *knobs)
        tok.block_until_ready()
        t1 = time.perf_counter()
        self.stats.prefill_s = t1 - t0
        done = np.zeros(b, bool)
        for step in range(max_new_tokens):
            # Dispatch the next step before reading this one's tokens, so host work overlaps device work.
            more = step + 1 < max_new_tokens
            if more:
                nxt, _, cache = decode_and_sample(self.model_def, self.weights, cache, tok, key, jnp.int32(step + 1),
                                                  *knobs)
            host = np.asarray(tok)
            out = [None if done[i] else int(host[i]) for i in range(b)]
            self.stats.new_tokens += sum(t is not None for t in out)
            if eos_id is not None:
                done |= host == eos_id
            self.stats.decode_steps = step
            self.stats.decode_s = time.perf_counter() - t1
            yield out
            if not more or done.all():
                return
            tok = nxt

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        """New tokens per prompt (ending with eos_id if it was produced). See `stream` for the arguments."""
        outs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, **sampling):
            for i, t in enumerate(step):
                if t is not None:
                    outs[i].append(t)
        return outs


def generate(model: DeepseekV2, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             cache_dtype=jnp.bfloat16) -> list[list[int]]:
    """Generates up to max_new_tokens for each prompt (token-id lists of any lengths); returns new tokens only.

    temperature 0 is greedy; the same seed gives the same samples. A sequence stops after emitting eos_id.
    """
    return DecodeEngine(model, cache_dtype=cache_dtype).generate(
        prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id)
