"""Decode benchmark: KV-cache size per token (paper table) and tokens/s of latent vs naive caches vs transformers.

  python tools/bench_decode.py [--batches 1,4,16] [--contexts 64,512] [--new 32] [--out bench.jsonl]

(a) latent: the engine's absorbed decode over c_KV + k_rope (576 elements/token/layer at V2 scale);
(b) naive: the same model decoding over a cache of decompressed per-head K (nope+rope) and V;
(c) MHA-equivalent: 2·heads·head_dim per token per layer (bytes only: the paper's reference point).
Throughput runs on a tiny random model (configs preset "tiny") next to transformers' eager `generate`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax import DecodeEngine, ModelConfig, load_model
from dsv2_jax.infer.engine import decode_and_sample
from dsv2_jax.infer.jit_model import split_for_jit
from dsv2_jax.infer.latent_cache import LatentCache
from kernels_pallas.reference import masked_softmax


def cache_table(cfg: ModelConfig, name: str) -> list[dict]:
    """Elements and bf16 bytes per token (all layers), as in the paper's Table 1."""
    layers, heads, dh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.v_head_dim
    kinds = {"MHA": 2 * heads * dh * layers, "GQA-8": 2 * 8 * dh * layers, "MQA": 2 * dh * layers,
             "MLA": cfg.latent_cache_dim * layers}
    return [{"table": "kv_cache_per_token", "model": name, "kind": k, "elements": n, "bytes_bf16": 2 * n,
             "vs_mha_pct": round(100 * (n / kinds["MHA"] - 1), 2)} for k, n in kinds.items()]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class NaiveKVCache:
    """The baseline's cache: per-head decompressed K (nope+rope) [L_g, B, S, H, dqk] and V [L_g, B, S, H, dv] per
    layer group. It plugs into the model's forward like the latent caches (model/layer_cache.py)."""
    k: tuple[jnp.ndarray, ...]
    v: tuple[jnp.ndarray, ...]
    lengths: jnp.ndarray  # [B]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, lengths) -> NaiveKVCache:
        h = cfg.num_attention_heads
        shape = lambda g, d: (g.count, batch, max_len, h, d)  # noqa: E731
        return cls(tuple(jnp.zeros(shape(g, cfg.qk_head_dim), jnp.bfloat16) for g in cfg.layer_groups()),
                   tuple(jnp.zeros(shape(g, cfg.v_head_dim), jnp.bfloat16) for g in cfg.layer_groups()), lengths)

    def group_view(self, g: int, positions) -> NaiveLayerKV:
        return NaiveLayerKV(self.k[g], self.v[g], jnp.int32(0), positions)

    def with_group_view(self, g: int, view: NaiveLayerKV) -> NaiveKVCache:
        put = lambda arrays, a: arrays[:g] + (a,) + arrays[g + 1:]  # noqa: E731
        return NaiveKVCache(put(self.k, view.k), put(self.v, view.v), self.lengths)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class NaiveLayerKV:
    k: jnp.ndarray
    v: jnp.ndarray
    layer: jnp.ndarray
    positions: jnp.ndarray  # [B, 1]: one decoded token per row

    def at(self, layer) -> NaiveLayerKV:
        return NaiveLayerKV(self.k, self.v, layer, self.positions)

    def write_and_attend(self, attn, q_nope, q_rope, ckv, k_rope):
        """Decompress the new token's K/V per head, store them, attend over the stored heads → [B,1,H,v]."""
        k_nope, v = attn.expand_kv(ckv)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))], -1)
        rows = jnp.arange(ckv.shape[0])[:, None]
        kc = self.k.at[self.layer, rows, self.positions].set(k.astype(self.k.dtype))
        vc = self.v.at[self.layer, rows, self.positions].set(v.astype(self.v.dtype))
        q = jnp.concatenate([q_nope, q_rope], -1)[:, 0]
        k_all, v_all = kc[self.layer], vc[self.layer]
        scores = jnp.einsum("bhd,bshd->bhs", q, k_all, preferred_element_type=jnp.float32) * attn.cfg.softmax_scale
        valid = jnp.arange(k_all.shape[1])[None, None] <= self.positions[:, :, None]  # [B, 1, S]
        o = jnp.einsum("bhs,bshv->bhv", masked_softmax(scores, valid).astype(q.dtype), v_all.astype(q.dtype))
        return o[:, None], NaiveLayerKV(kc, vc, self.layer, self.positions)


def naive_step(model, cache: NaiveKVCache, tokens):
    """One greedy decode step over the naive cache: the model's own forward → (tokens [B], cache)."""
    h, cache, _ = model.forward(tokens[:, None], cache.lengths[:, None], cache=cache)
    tokens = jnp.argmax(model.logits(h)[:, 0], -1).astype(jnp.int32)
    return tokens, NaiveKVCache(cache.k, cache.v, cache.lengths + 1)


def time_steps(fn, carry, steps: int) -> float:
    carry = fn(*carry)  # compile + warm up
    jax.block_until_ready(carry)
    t0 = time.perf_counter()
    for _ in range(steps):
        carry = fn(*carry)
    jax.block_until_ready(carry)
    return time.perf_counter() - t0


def cache_throughput(model, batch: int, context: int, new: int) -> list[dict]:
    """Decode-step time of the absorbed latent cache vs a naive decompressed K/V cache (plus MHA-equivalent bytes),
    `new` steps from `context` cached tokens; rows carry impl, cache_bytes, s and tokens_per_s."""
    cfg = model.config
    model_def, weights = split_for_jit(model)
    max_len = 1 << (context + new).bit_length()
    rng = np.random.default_rng(0)
    lengths = jnp.full((batch,), context, jnp.int32)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, batch), jnp.int32)
    rows = []

    cache = LatentCache.zeros(cfg, batch, max_len).replace(lengths=lengths)
    latent_bytes = cache.nbytes
    knobs = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.key(0)

    def latent(tok, cache):
        tok, _, cache = decode_and_sample(model_def, weights, cache, tok, key, jnp.int32(1), *knobs)
        return tok, cache
    dt = time_steps(latent, (tokens, cache), new)
    rows.append({"impl": "latent_absorbed", "cache_bytes": latent_bytes, "s": dt})

    h = cfg.num_attention_heads
    naive_cache = NaiveKVCache.zeros(cfg, batch, max_len, jnp.full((batch,), context, jnp.int32))  # lengths: donated
    naive_bytes = sum(a.size * a.dtype.itemsize for a in (*naive_cache.k, *naive_cache.v))
    naive = jax.jit(lambda tok, c: naive_step(model_def.merge(weights), c, tok), donate_argnums=1)
    dt = time_steps(naive, (tokens, naive_cache), new)
    rows.append({"impl": "naive_decompressed_kv", "cache_bytes": naive_bytes, "s": dt})
    rows.append({"impl": "mha_equivalent", "cache_bytes": 2 * h * cfg.v_head_dim * cfg.num_hidden_layers * 2 * batch
                 * max_len, "s": None})
    return _throughput(rows, batch, context, new)


def _throughput(rows: list[dict], batch: int, context: int, new: int) -> list[dict]:
    for r in rows:
        r.update(table="throughput", batch=batch, context=context, new_tokens=new,
                 tokens_per_s=None if r["s"] is None else round(batch * new / r["s"], 1))
    return rows


def bench_point(model, torch_model, batch: int, context: int, new: int) -> list[dict]:
    cfg = model.config
    rows = cache_throughput(model, batch, context, new)
    rng = np.random.default_rng(0)
    # End to end (prefill + decode) against transformers' eager generate with its KV cache, same prompts.
    import torch
    prompts = rng.integers(3, cfg.vocab_size, (batch, context)).tolist()
    engine = DecodeEngine(model)
    engine.generate(prompts, new)  # compile
    t0 = time.perf_counter()
    engine.generate(prompts, new)
    ours = time.perf_counter() - t0
    ours_decode = engine.stats.decode_s * new / max(engine.stats.decode_steps, 1)  # the new-1 steps after prefill
    ids = torch.tensor(prompts)
    torch_model.generation_config.eos_token_id = None

    def hf_generate(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - t0

    hf_generate(2)  # warm up
    hf = hf_generate(new)
    hf_decode = (hf - hf_generate(1)) * new / (new - 1)  # generate(1) is prefill + first token
    rows += _throughput([{"impl": "engine_end_to_end", "cache_bytes": engine.cache_nbytes, "s": ours},
                         {"impl": "transformers_eager_generate", "cache_bytes": None, "s": hf},
                         {"impl": "engine_decode_only", "cache_bytes": engine.cache_nbytes, "s": ours_decode},
                         {"impl": "transformers_decode_only", "cache_bytes": None, "s": hf_decode}],
                        batch, context, new)
    rows[-4]["speedup_vs_transformers"] = round(hf / ours, 2)
    rows[-2]["speedup_vs_transformers"] = round(hf_decode / ours_decode, 2)
    return rows


def tiny_pair(directory: str, cfg: ModelConfig | None = None):
    """A random transformers model (default: the tiny preset) saved as a checkpoint, and the same weights loaded
    here (fp32)."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from dsv2_jax.config import to_hf_dict

    torch.manual_seed(0)
    torch_model = DeepseekV2ForCausalLM(DeepseekV2Config(**to_hf_dict(cfg or ModelConfig.preset("tiny")))).float().eval()
    torch_model.save_pretrained(directory)
    return load_model(directory), torch_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--contexts", default="64,512")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", help="append JSON lines here")
    args = ap.parse_args(argv)
    rows = cache_table(ModelConfig.preset("deepseek-v2"), "DeepSeek-V2")
    rows += cache_table(ModelConfig.preset("deepseek-v2-lite"), "DeepSeek-V2-Lite")
    for r in rows:
        print(f"{r['model']:<17} {r['kind']:<6} {r['elements']:>10,} elem/token {r['bytes_bf16']:>10,} B/token "
              f"{r['vs_mha_pct']:>7.2f}% vs MHA")
    with tempfile.TemporaryDirectory() as d:
        model, torch_model = tiny_pair(d)
        for b in map(int, args.batches.split(",")):
            for c in map(int, args.contexts.split(",")):
                point = bench_point(model, torch_model, b, c, args.new)
                for r in point:
                    speedup = r.get("speedup_vs_transformers")
                    print(f"B={b:<3} ctx={c:<5} {r['impl']:<28} cache {r['cache_bytes'] or 0:>12,} B  "
                          f"{r['tokens_per_s'] or float('nan'):>10.1f} tok/s" + (f"  x{speedup} vs HF" if speedup else ""))
                rows += point
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
