"""What a decoder layer needs from a KV cache: one call that stores the new tokens and attends over the context.

The model is called with a cache (or None: training). For each stacked layer group it asks the cache for a
`LayerCache` (`cache.group_view(g, positions)`), carries it through the group's layer scan, pointing it at each
layer in turn (`view.at(i)`), and hands the result back (`cache.with_group_view(g, view)`). Inside the layer, MLA
calls `view.write_and_attend(attn, ...)`; everything about where tokens live (a dense [L, B, S, ·] stack, a pool of
pages, decompressed per-head K/V in tools/bench_decode.py) stays behind that call.

`LatentLayerCache` is the shared part of the two latent caches (infer/latent_cache.py, serve/paged_cache.py): they
supply `write`, `view` and `attend_token`; the choice between the training path's attention, one-token absorbed
decode and absorbed attention over the stored context is made once, here.
"""

from __future__ import annotations

from typing import Protocol

import jax.numpy as jnp


class LayerCache(Protocol):
    def at(self, layer) -> LayerCache:
        """The same cache pointed at layer `layer` (an int32 scalar, traced inside the scan) of its group."""

    def write_and_attend(self, attn, q_nope, q_rope, ckv, k_rope) -> tuple[jnp.ndarray, LayerCache]:
        """Store the new tokens' latents ckv [B,T,C], k_rope [B,T,R] (post-RoPE) and attend the queries
        q_nope [B,T,H,nope], q_rope [B,T,H,rope] over everything the rows hold, with `attn`'s (an MLA) weights
        and cores → (o [B,T,H,v], the cache with the tokens written)."""


class LatentStacks:
    """What the dense and the paged latent caches share: per layer group one c_KV stack (`ckv`) and one k_rope
    stack (`krope`), whatever their inner layout."""

    @property
    def dtype(self):
        return self.ckv[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the latent stacks (bookkeeping such as lengths not counted)."""
        return sum(a.size * a.dtype.itemsize for a in (*self.ckv, *self.krope))


class LatentLayerCache:
    """Attention over a cache of MLA latents; subclasses are frozen pytree dataclasses holding one layer group.

    `fresh` (static): nothing was cached before this call, so the new tokens (written from position 0) are the
    whole context and attend to each other by the training path's causal attention (expanded, or the flash
    kernel), exactly as the model's forward does.
    """

    fresh: bool = False

    def write(self, ckv, k_rope):
        """ckv [B,T,C], k_rope [B,T,R] stored at this call's positions of this layer → the updated cache."""
        raise NotImplementedError

    def view(self, dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Each row's context in `dtype`: (ckv [B,S,C], krope [B,S,R], mask [B,1,T,S] key visible to query)."""
        raise NotImplementedError

    def attend_token(self, impl: str, q_lat, q_rope, *, scale) -> jnp.ndarray:
        """One query token per row over its context, W_UK absorbed: q_lat [B,H,C], q_rope [B,H,R] → o_lat
        [B,H,C] (the latent decode kernel that reads this layout)."""
        raise NotImplementedError

    def write_and_attend(self, attn, q_nope, q_rope, ckv, k_rope):
        cache = self.write(ckv, k_rope)
        if cache.fresh:
            return attn.attend_sequence(q_nope, q_rope, ckv, k_rope, phase="prefill"), cache
        if q_nope.shape[1] == 1:
            return attn.attend_token(q_nope, q_rope, lambda q_lat, q_r: cache.attend_token(
                attn.cfg.attention_impl, q_lat, q_r, scale=attn.cfg.softmax_scale)), cache
        ckv_all, krope_all, mask = cache.view(q_nope.dtype)
        return attn.attend_absorbed(q_nope, q_rope, ckv_all, krope_all, mask), cache
