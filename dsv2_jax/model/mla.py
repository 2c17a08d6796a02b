"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Keys and values are compressed into one latent c_KV (kv_lora_rank) per token plus one shared post-RoPE key
k_rope (qk_rope_head_dim). Two equivalent ways to attend over them (which kernel runs each: attention_backend):
  * expanded: decompress K/V per head with W_UK / W_UV, then ordinary attention (prefill, training);
  * absorbed: fold W_UK into the query and W_UV into the output, so attention runs directly on the latent
    cache as MQA with one 576-dim key and 512-dim value (decode: reads 576 elements per cached token).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dsv2_jax.ops import attention_backend
from dsv2_jax.config import ModelConfig
from dsv2_jax.model.layers import RMSNorm, param
from dsv2_jax.model.rope import apply_rope
from kernels_pallas.reference import masked_softmax


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, stack=()):
        h, dqk = cfg.num_attention_heads, cfg.qk_head_dim
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.wq = param((cfg.hidden_size, h, dqk), ("embed", "heads", "head_dim"), dtype, stack)
        else:
            self.wq_a = param((cfg.hidden_size, cfg.q_lora_rank), ("embed", "q_lora"), dtype, stack)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, "q_lora", stack)
            self.wq_b = param((cfg.q_lora_rank, h, dqk), ("q_lora", "heads", "head_dim"), dtype, stack)
        self.wkv_a = param((cfg.hidden_size, cfg.latent_cache_dim), ("embed", "kv_lora"), dtype, stack)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype, "kv_lora", stack)
        self.w_uk = param((cfg.kv_lora_rank, h, cfg.qk_nope_head_dim), ("kv_lora", "heads", "head_dim"),
                          dtype, stack)
        self.w_uv = param((cfg.kv_lora_rank, h, cfg.v_head_dim), ("kv_lora", "heads", "head_dim"), dtype, stack)
        self.wo = param((h, cfg.v_head_dim, cfg.hidden_size), ("heads", "head_dim", "embed"), dtype, stack)

    # ---- projections -----------------------------------------------------------------------------
    def queries(self, x, cos, sin) -> tuple[jnp.ndarray, jnp.ndarray]:
        """q_nope [B,T,H,nope], RoPE'd q_rope [B,T,H,rope]."""
        if self.cfg.q_lora_rank is None:
            q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        else:
            q = jnp.einsum("btq,qhk->bthk", self.q_norm(x @ self.wq_a[...]), self.wq_b[...])
        q_nope, q_rope = jnp.split(q, [self.cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latents(self, x, cos, sin) -> tuple[jnp.ndarray, jnp.ndarray]:
        """What the cache stores: normalised c_KV [B,T,kv_lora] and RoPE'd shared key k_rope [B,T,rope]."""
        ckv, k_rope = jnp.split(x @ self.wkv_a[...], [self.cfg.kv_lora_rank], axis=-1)
        return self.kv_norm(ckv), apply_rope(k_rope, cos, sin)

    # ---- attention cores ---------------------------------------------------------------------------
    def expand_kv(self, ckv) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-head k_nope [B,S,H,nope] and v [B,S,H,v] decompressed from the latent."""
        return (jnp.einsum("bsc,chn->bshn", ckv, self.w_uk[...]),
                jnp.einsum("bsc,chv->bshv", ckv, self.w_uv[...]))

    def attend_expanded(self, q_nope, q_rope, ckv, k_rope, mask) -> jnp.ndarray:
        """Ordinary attention on decompressed K/V (the XLA core); mask [B,1|H,Tq,Tk]. Returns [B,Tq,H,v]."""
        k_nope, v = self.expand_kv(ckv)
        return attention_backend.xla_attention(q_nope, q_rope, k_nope, k_rope, v, mask, self.cfg.softmax_scale)

    def attend_absorbed(self, q_nope, q_rope, ckv, k_rope, mask) -> jnp.ndarray:
        """Same result computed on the latent: W_UK folded into q, W_UV applied after. Returns [B,Tq,H,v]."""
        q_lat = jnp.einsum("bthn,chn->bthc", q_nope, self.w_uk[...])
        scores = (jnp.einsum("bthc,bsc->bhts", q_lat, ckv, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
        probs = masked_softmax(scores * self.cfg.softmax_scale, mask).astype(ckv.dtype)
        o_lat = jnp.einsum("bhts,bsc->bthc", probs, ckv)
        return jnp.einsum("bthc,chv->bthv", o_lat, self.w_uv[...])

    def output(self, o: jnp.ndarray) -> jnp.ndarray:
        return jnp.einsum("bthv,hvd->btd", o, self.wo[...])

    def attend_sequence(self, x, cos, sin, segment_ids=None, phase: str = "train"):
        """Causal self-attention over x [B,T,D] (optionally packed): (out [B,T,D], (ckv, k_rope) to cache).

        The core (XLA, or a flash kernel) is chosen by attention_backend from attention_impl, platform and phase.
        """
        q_nope, q_rope = self.queries(x, cos, sin)
        ckv, k_rope = self.latents(x, cos, sin)
        k_nope, v = self.expand_kv(ckv)
        o = attention_backend.sequence_attention(self.cfg.attention_impl, phase, q_nope, q_rope, k_nope, k_rope, v,
                                                 segment_ids, self.cfg.softmax_scale)
        return self.output(o), (ckv, k_rope)

    def __call__(self, x, cos, sin, segment_ids=None) -> jnp.ndarray:
        return self.attend_sequence(x, cos, sin, segment_ids)[0]

    def decode(self, x, cos, sin, cache_ckv, cache_krope, layer, lengths):
        """One new token per sequence with weight absorption over the latent cache.

        x [B,1,D] at positions `lengths` (cos/sin [B,1,rope/2]); cache_ckv [L,B,S,C], cache_krope [L,B,S,R] are
        the whole layer group's cache, of which this is layer `layer`, holding `lengths[b]` valid tokens. Only
        the new token's 576 numbers are written, in place; attention reads the layer's slice where it lies.
        Returns (out [B,1,D], cache_ckv, cache_krope) with this token appended.
        """
        q_nope, q_rope = self.queries(x, cos, sin)
        ckv, k_rope = self.latents(x, cos, sin)
        rows = jnp.arange(x.shape[0])
        cache_ckv = cache_ckv.at[layer, rows, lengths].set(ckv[:, 0].astype(cache_ckv.dtype))
        cache_krope = cache_krope.at[layer, rows, lengths].set(k_rope[:, 0].astype(cache_krope.dtype))
        q_lat = jnp.einsum("bhn,chn->bhc", q_nope[:, 0], self.w_uk[...])
        o_lat = attention_backend.decode_attention(self.cfg.attention_impl, q_lat, q_rope[:, 0], cache_ckv,
                                                   cache_krope, lengths + 1, scale=self.cfg.softmax_scale, layer=layer)
        o = jnp.einsum("bhc,chv->bhv", o_lat, self.w_uv[...])
        return self.output(o[:, None]), cache_ckv, cache_krope
