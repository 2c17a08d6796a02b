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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax import DecodeEngine, ModelConfig, load_model
from dsv2_jax.infer.engine import decode_and_sample
from dsv2_jax.infer.latent_cache import LatentCache
from kernels_pallas.reference import masked_softmax
from dsv2_jax.model.transformer import scan_layers
from dsv2_jax.model.rope import rope_tables


def cache_table(cfg: ModelConfig, name: str) -> list[dict]:
    """Elements and bf16 bytes per token (all layers), as in the paper's Table 1."""
    layers, heads, dh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.v_head_dim
    kinds = {"MHA": 2 * heads * dh * layers, "GQA-8": 2 * 8 * dh * layers, "MQA": 2 * dh * layers,
             "MLA": cfg.latent_cache_dim * layers}
    return [{"table": "kv_cache_per_token", "model": name, "kind": k, "elements": n, "bytes_bf16": 2 * n,
             "vs_mha_pct": round(100 * (n / kinds["MHA"] - 1), 2)} for k, n in kinds.items()]


def naive_step(model, k_cache, v_cache, lengths, tokens):
    """One decode step over per-head decompressed K/V caches ([L_g, B, S, H, nope+rope] / [.., v]), per group."""
    cfg = model.config
    cos, sin = rope_tables(cfg, lengths[:, None])
    rows = jnp.arange(tokens.shape[0])

    def step(layer, x, kv):
        attn, xn = layer.attn, layer.attn_norm(x)
        q_nope, q_rope = attn.queries(xn, cos, sin)
        ckv, k_rope = attn.latents(xn, cos, sin)
        k_nope = jnp.einsum("bc,chn->bhn", ckv[:, 0], attn.w_uk[...])
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, 0, None], (*k_nope.shape[:2], k_rope.shape[-1]))], -1)
        v = jnp.einsum("bc,chv->bhv", ckv[:, 0], attn.w_uv[...])
        kc, vc = kv[0].at[rows, lengths].set(k.astype(kv[0].dtype)), kv[1].at[rows, lengths].set(v.astype(kv[1].dtype))
        q = jnp.concatenate([q_nope, q_rope], -1)[:, 0]
        scores = jnp.einsum("bhd,bshd->bhs", q, kc, preferred_element_type=jnp.float32) * cfg.softmax_scale
        valid = jnp.arange(kc.shape[1])[None, None] <= lengths[:, None, None]
        o = jnp.einsum("bhs,bshv->bhv", masked_softmax(scores, valid).astype(q.dtype), vc.astype(q.dtype))
        h, _ = layer.feed_forward(x + attn.output(o[:, None]), None)
        return h, (kc, vc)

    h = model.embed_tokens(tokens[:, None])
    ks, vs = [], []
    for (layers, _), kg, vg in zip(model.layer_groups(), k_cache, v_cache):
        h, (kg, vg) = scan_layers(layers, h, step, xs=(kg, vg))
        ks.append(kg)
        vs.append(vg)
    return jnp.argmax(model.logits(h)[:, 0], -1).astype(jnp.int32), tuple(ks), tuple(vs), lengths + 1


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
    graphdef, state = nnx.split(model)
    max_len = 1 << (context + new).bit_length()
    rng = np.random.default_rng(0)
    lengths = jnp.full((batch,), context, jnp.int32)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, batch), jnp.int32)
    groups = [n for n in (cfg.num_dense_layers, cfg.num_moe_layers) if n]
    rows = []

    cache = LatentCache.zeros(cfg, batch, max_len).replace(lengths=lengths)
    latent_bytes = cache.nbytes
    knobs = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.key(0)

    def latent(tok, cache):
        tok, _, cache = decode_and_sample(graphdef, state, cache, tok, key, jnp.int32(1), *knobs)
        return tok, cache
    dt = time_steps(latent, (tokens, cache), new)
    rows.append({"impl": "latent_absorbed", "cache_bytes": latent_bytes, "s": dt})

    h, dqk = cfg.num_attention_heads, cfg.qk_head_dim
    kc = tuple(jnp.zeros((n, batch, max_len, h, dqk), jnp.bfloat16) for n in groups)
    vc = tuple(jnp.zeros((n, batch, max_len, h, cfg.v_head_dim), jnp.bfloat16) for n in groups)
    naive_bytes = sum(a.size * a.dtype.itemsize for a in (*kc, *vc))
    naive = jax.jit(lambda tok, k, v, n: naive_step(nnx.merge(graphdef, state), k, v, n, tok)[:4],
                    donate_argnums=(1, 2))
    dt = time_steps(naive, (tokens, kc, vc, jnp.full((batch,), context, jnp.int32)), new)
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
