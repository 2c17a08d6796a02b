"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Keys and values are compressed into one latent c_KV (kv_lora_rank) per token plus one shared post-RoPE key
k_rope (qk_rope_head_dim). Two equivalent ways to attend over them:
  * expanded: decompress K/V per head with W_UK / W_UV, then ordinary attention (prefill, training);
  * absorbed: fold W_UK into the query and W_UV into the output, so attention runs directly on the latent
    cache as MQA with one 576-dim key and 512-dim value (decode: reads 576 elements per cached token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas

from dsv2_jax.config import ModelConfig
from dsv2_jax.layers import RMSNorm, param
from dsv2_jax.rope import apply_rope

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)


def causal_segment_mask(segment_ids: jnp.ndarray | None, batch: int, length: int) -> jnp.ndarray:
    """[B, 1, T, T] bool: causal within the row and, for packed rows, within equal segment ids."""
    idx = jnp.arange(length)
    mask = (idx[:, None] >= idx[None, :])[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jnp.broadcast_to(mask, (batch, 1, length, length))


def pallas_backend(cfg: ModelConfig) -> str | None:
    """The kernels_pallas backend for this config, or None for plain XLA attention.

    "auto" uses the kernels where they compile (GPU/TPU); "pallas" forces them, interpreted on CPU (tests).
    """
    compiled = kernels_pallas.default_backend()
    if cfg.attention_impl == "xla" or (cfg.attention_impl == "auto" and compiled == "xla"):
        return None
    return "interpret" if compiled == "xla" else compiled


def latent_attention(q_lat, q_rope, ckv, krope, lengths, *, scale, layer) -> jnp.ndarray:
    """Absorbed single-query attention over one layer of a stacked latent cache (pure jnp).

    q_lat [B,H,C] (W_UK already folded in), q_rope [B,H,R], ckv [L,B,S,C], krope [L,B,S,R]; row b of layer
    `layer` attends to cache positions < lengths[b]. Returns o_lat [B,H,C] in q_lat's dtype (W_UV is applied
    by the caller). Same contract as kernels_pallas.mla_decode(..., layer=...).
    """
    ckv, krope = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in (ckv, krope))
    scores = (jnp.einsum("bhc,bsc->bhs", q_lat, ckv, preferred_element_type=jnp.float32)
              + jnp.einsum("bhr,bsr->bhs", q_rope, krope, preferred_element_type=jnp.float32))
    valid = jnp.arange(ckv.shape[1])[None, None, :] < lengths[:, None, None]
    probs = masked_softmax(scores * scale, valid).astype(q_lat.dtype)
    return jnp.einsum("bhs,bsc->bhc", probs, ckv.astype(q_lat.dtype))


def latent_attention_impl(cfg: ModelConfig):
    """The decode attention core for this config: the Pallas flash-decoding kernel or the jnp version."""
    backend = pallas_backend(cfg)
    if backend is None:
        return latent_attention
    return lambda q_lat, q_rope, ckv, krope, lengths, *, scale, layer: kernels_pallas.mla_decode(
        q_lat, q_rope, ckv, krope, lengths, scale=scale, layer=layer, backend=backend)[0]


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
        """Ordinary attention on decompressed K/V; mask [B,1|H,Tq,Tk]. Returns [B,Tq,H,v]."""
        k_nope, v = self.expand_kv(ckv)
        scores = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
        probs = masked_softmax(scores * self.cfg.softmax_scale, mask).astype(v.dtype)
        return jnp.einsum("bhts,bshv->bthv", probs, v)

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

    def attend_flash(self, q_nope, q_rope, ckv, k_rope, segment_ids, backend: str) -> jnp.ndarray:
        """The fused Pallas kernel (causal, segment-aware) on decompressed K/V: qk dim 192, v dim 128."""
        k_nope, v = self.expand_kv(ckv)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], q_rope.shape[:3] + k_rope.shape[-1:])],
                            axis=-1)
        return kernels_pallas.flash_mla_attention(q, k, v, scale=self.cfg.softmax_scale, segment_ids=segment_ids,
                                                  causal=True, backend=backend)

    def attend_sequence(self, x, cos, sin, segment_ids=None, absorbed: bool = False):
        """Causal self-attention over x [B,T,D] (optionally packed): (out [B,T,D], (ckv, k_rope) to cache)."""
        q_nope, q_rope = self.queries(x, cos, sin)
        ckv, k_rope = self.latents(x, cos, sin)
        backend = pallas_backend(self.cfg)
        if backend is not None and not absorbed:
            o = self.attend_flash(q_nope, q_rope, ckv, k_rope, segment_ids, backend)
        else:
            mask = causal_segment_mask(segment_ids, x.shape[0], x.shape[1])
            o = (self.attend_absorbed if absorbed else self.attend_expanded)(q_nope, q_rope, ckv, k_rope, mask)
        return self.output(o), (ckv, k_rope)

    def __call__(self, x, cos, sin, segment_ids=None, absorbed: bool = False) -> jnp.ndarray:
        return self.attend_sequence(x, cos, sin, segment_ids, absorbed)[0]

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
        attend = latent_attention_impl(self.cfg)
        o_lat = attend(q_lat, q_rope[:, 0], cache_ckv, cache_krope, lengths + 1, scale=self.cfg.softmax_scale,
                       layer=layer)
        o = jnp.einsum("bhc,chv->bhv", o_lat, self.w_uv[...])
        return self.output(o[:, None]), cache_ckv, cache_krope
