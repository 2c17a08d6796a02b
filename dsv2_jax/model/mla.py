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

    def attend_sequence(self, q_nope, q_rope, ckv, k_rope, segment_ids=None, phase: str = "train") -> jnp.ndarray:
        """Causal self-attention among T new tokens (packed: within equal segment_ids [B,T]) → [B,T,H,v].

        q_nope [B,T,H,nope], q_rope [B,T,H,rope], ckv [B,T,C], k_rope [B,T,rope]. The core (XLA, or a flash
        kernel) is chosen by attention_backend from attention_impl, platform and phase.
        """
        k_nope, v = self.expand_kv(ckv)
        return attention_backend.sequence_attention(self.cfg.attention_impl, phase, q_nope, q_rope, k_nope, k_rope,
                                                    v, segment_ids, self.cfg.softmax_scale)

    def attend_token(self, q_nope, q_rope, attend_latent) -> jnp.ndarray:
        """One query token per row, absorbed: q_nope [B,1,H,nope], q_rope [B,1,H,rope] → [B,1,H,v].

        attend_latent(q_lat [B,H,C], q_rope [B,H,R]) → o_lat [B,H,C] is the cache's latent decode kernel.
        """
        q_lat = jnp.einsum("bhn,chn->bhc", q_nope[:, 0], self.w_uk[...])
        o_lat = attend_latent(q_lat, q_rope[:, 0])
        return jnp.einsum("bhc,chv->bhv", o_lat, self.w_uv[...])[:, None]

    def __call__(self, x, rope, *, cache=None, segment_ids=None):
        """x [B,T,D] at the positions of rope = (cos, sin) [B,T,rope/2] → (out [B,T,D], cache).

        Without a cache (training) the tokens attend causally to each other (within equal segment_ids); with
        one (a model.layer_cache.LayerCache) their latents are stored and they attend over all the row holds.
        """
        cos, sin = rope
        q_nope, q_rope = self.queries(x, cos, sin)
        ckv, k_rope = self.latents(x, cos, sin)
        if cache is None:
            o = self.attend_sequence(q_nope, q_rope, ckv, k_rope, segment_ids)
        else:
            o, cache = cache.write_and_attend(self, q_nope, q_rope, ckv, k_rope)
        return self.output(o), cache
