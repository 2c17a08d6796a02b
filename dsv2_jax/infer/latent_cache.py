"""The MLA inference cache: per token per layer only the normalised latent c_KV and the post-RoPE shared key.

One (ckv [L, B, S, kv_lora_rank], krope [L, B, S, qk_rope_head_dim]) pair per layer group
(config.layer_groups()), stacked over the group's layers exactly like its parameters, so a decode step scans the
cache alongside the layer stack. `lengths[b]` counts the valid tokens of row b; rows past it are garbage that
attention masks out. This file is the whole of the dense layout: the layers see it only through
`DenseLayerCache` (model/layer_cache.py's contract).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.layer_cache import LatentLayerCache, LatentStacks
from dsv2_jax.ops import attention_backend


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LatentCache(LatentStacks):
    ckv: tuple[jnp.ndarray, ...]    # per layer group: [L_g, B, S, kv_lora_rank]
    krope: tuple[jnp.ndarray, ...]  # per layer group: [L_g, B, S, qk_rope_head_dim]
    lengths: jnp.ndarray            # [B] int32, tokens already cached per sequence
    fresh: bool = field(default=False, metadata=dict(static=True))  # nothing written yet (see LatentLayerCache)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> LatentCache:
        """An empty cache of `batch` rows of `max_len` tokens; its first model call writes from position 0."""
        groups = [g.count for g in cfg.layer_groups()]
        return cls(ckv=tuple(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype) for n in groups),
                   krope=tuple(jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype) for n in groups),
                   lengths=jnp.zeros((batch,), jnp.int32), fresh=True)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.ckv[0].shape[2]

    def replace(self, **kw) -> LatentCache:
        """A copy with fields replaced; `fresh` is dropped unless given (new lengths mean tokens are held)."""
        return LatentCache(**{"ckv": self.ckv, "krope": self.krope, "lengths": self.lengths, **kw})

    # ---- what the model's forward uses (model/layer_cache.py) ------------------------------------------------
    def group_view(self, g: int, positions: jnp.ndarray) -> DenseLayerCache:
        """Layer 0 of group g, for new tokens at positions [B, T] (row b continues at lengths[b])."""
        return DenseLayerCache(self.ckv[g], self.krope[g], jnp.int32(0), positions, self.fresh)

    def with_group_view(self, g: int, view: DenseLayerCache) -> LatentCache:
        """Group g's arrays taken back from the view its layer scan wrote; lengths are the caller's to advance."""
        put = lambda arrays, a: arrays[:g] + (a,) + arrays[g + 1:]  # noqa: E731
        return LatentCache(put(self.ckv, view.ckv), put(self.krope, view.krope), self.lengths, self.fresh)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DenseLayerCache(LatentLayerCache):
    """One layer of a dense group stack, carried through the layer scan. The decode kernel gets the whole stack
    and the layer index, not `ckv[layer]`: a Pallas call cannot take a slice of its operand in place, so inside
    the scan XLA would copy the layer's [B, S, C] (all the cache this layer reads) into a new buffer each step."""

    ckv: jnp.ndarray        # [L_g, B, S, C]
    krope: jnp.ndarray      # [L_g, B, S, R]
    layer: jnp.ndarray      # int32 scalar: which layer of the stack
    positions: jnp.ndarray  # [B, T] int32: where this call's tokens go
    fresh: bool = field(default=False, metadata=dict(static=True))

    def at(self, layer) -> DenseLayerCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, ckv, k_rope) -> DenseLayerCache:
        rows = jnp.arange(ckv.shape[0])[:, None]

        def put(a, x):
            if self.fresh:  # a prompt from position 0: one contiguous slab per layer
                return jax.lax.dynamic_update_slice(a, x[None].astype(a.dtype), (self.layer, 0, 0, 0))
            return a.at[self.layer, rows, self.positions].set(x.astype(a.dtype))  # token t of row b at positions[b, t]

        return dataclasses.replace(self, ckv=put(self.ckv, ckv), krope=put(self.krope, k_rope))

    def view(self, dtype):
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False).astype(dtype)  # noqa: E731
        mask = jnp.arange(self.ckv.shape[2])[None, None, None, :] <= self.positions[:, None, :, None]
        return pick(self.ckv), pick(self.krope), mask

    def attend_token(self, impl, q_lat, q_rope, *, scale):
        return attention_backend.decode_attention(impl, q_lat, q_rope, self.ckv, self.krope, self.positions[:, 0] + 1,
                                                  scale=scale, layer=self.layer)
