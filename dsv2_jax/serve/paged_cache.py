"""The paged MLA latent cache: one preallocated pool of fixed-size pages per layer group.

Each page holds `page_size` tokens' normalised c_KV and post-RoPE k_rope for every layer of its group, stacked like
the group's parameters (ckv [L_g, P, page, kv_lora_rank], krope [L_g, P, page, qk_rope_head_dim]). A sequence owns
a list of page ids (its block table); token t lives at (table[t // page], t % page). Page 0 is never handed out:
padding tokens of a bucketed batch write there, so no real page is ever touched by padding.

The model reads and writes the pool through `PagedLatentCache.for_batch(block_tables, n_new)`: this file is the
whole of the paged layout (model/layer_cache.py is the contract the layers see).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.layer_cache import LatentLayerCache, LatentStacks
from dsv2_jax.ops import attention_backend
from kernels_pallas.paged_mla_decode import gather_pages

TRASH_PAGE = 0


def page_nbytes(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of one page over all layers: (kv_lora_rank + qk_rope_head_dim) · layers · page_size · itemsize."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * page_size * jnp.dtype(dtype).itemsize


def pages_for_budget(cfg: ModelConfig, page_size: int, dtype, budget_bytes: int) -> int:
    """How many pages (the trash page included) fit in `budget_bytes`; at least 2."""
    n = budget_bytes // page_nbytes(cfg, page_size, dtype)
    if n < 2:
        raise ValueError(f"cache memory budget {budget_bytes} B holds fewer than 2 pages of "
                         f"{page_nbytes(cfg, page_size, dtype)} B")
    return int(n)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedLatentCache(LatentStacks):
    ckv: tuple[jnp.ndarray, ...]    # per layer group: [L_g, P, page, kv_lora_rank]
    krope: tuple[jnp.ndarray, ...]  # per layer group: [L_g, P, page, qk_rope_head_dim]

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_pages: int, page_size: int = 64, dtype=jnp.bfloat16,
              sharding=None) -> PagedLatentCache:
        """An empty pool; `sharding` (e.g. replicated over a mesh: the latent is shared by all heads) places it."""
        groups = [g.count for g in cfg.layer_groups()]

        def make(n, width):
            a = jnp.zeros((n, num_pages, page_size, width), dtype)
            return a if sharding is None else jax.device_put(a, sharding)

        return cls(ckv=tuple(make(n, cfg.kv_lora_rank) for n in groups),
                   krope=tuple(make(n, cfg.qk_rope_head_dim) for n in groups))

    @property
    def num_pages(self) -> int:
        return self.ckv[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.ckv[0].shape[2]

    def for_batch(self, block_tables: jnp.ndarray, n_new: jnp.ndarray) -> PagedBatch:
        """The pool addressed for one batch: block_tables [B, N] page ids, n_new [B] real new tokens per row."""
        return PagedBatch(self, block_tables.astype(jnp.int32), n_new)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedBatch:
    """A pool plus one batch's block tables: the cache the model's forward is called with."""
    pool: PagedLatentCache
    block_tables: jnp.ndarray  # [B, N] int32
    n_new: jnp.ndarray         # [B] int32, 0..T (0: a padding row)

    def group_view(self, g: int, positions: jnp.ndarray) -> PagedLayerCache:
        """Layer 0 of group g for new tokens at positions [B, T]; tokens t >= n_new[b] write to the trash page."""
        page = self.pool.page_size
        valid = jnp.arange(positions.shape[1])[None, :] < self.n_new[:, None]
        slot = jnp.clip(positions // page, 0, self.block_tables.shape[1] - 1)
        write_page = jnp.where(valid, jnp.take_along_axis(self.block_tables, slot, axis=1), TRASH_PAGE)
        lengths = positions[:, 0] + jnp.maximum(self.n_new, 1)  # decode attends up to and including its token
        return PagedLayerCache(self.pool.ckv[g], self.pool.krope[g], jnp.int32(0), self.block_tables, positions,
                               write_page, positions % page, lengths)

    def with_group_view(self, g: int, view: PagedLayerCache) -> PagedBatch:
        put = lambda arrays, a: arrays[:g] + (a,) + arrays[g + 1:]  # noqa: E731
        pool = PagedLatentCache(put(self.pool.ckv, view.ckv), put(self.pool.krope, view.krope))
        return PagedBatch(pool, self.block_tables, self.n_new)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedLayerCache(LatentLayerCache):
    """One layer of a group's page pool, carried through the layer scan. The decode kernel gets the whole pool
    and the layer index: `ckv[layer]` inside the scan would copy that layer's entire pool every step."""

    ckv: jnp.ndarray           # [L_g, P, page, C]
    krope: jnp.ndarray         # [L_g, P, page, R]
    layer: jnp.ndarray         # int32 scalar
    block_tables: jnp.ndarray  # [B, N] int32
    positions: jnp.ndarray     # [B, T] int32 absolute positions of the new tokens
    write_page: jnp.ndarray    # [B, T] int32 page of each new token (TRASH_PAGE for padding)
    write_off: jnp.ndarray     # [B, T] int32 slot in that page
    lengths: jnp.ndarray       # [B] int32 tokens a one-token row attends to

    def at(self, layer) -> PagedLayerCache:
        return dataclasses.replace(self, layer=layer)

    def write(self, ckv, k_rope) -> PagedLayerCache:
        put = lambda a, x: a.at[self.layer, self.write_page, self.write_off].set(x.astype(a.dtype))  # noqa: E731
        return dataclasses.replace(self, ckv=put(self.ckv, ckv), krope=put(self.krope, k_rope))

    def view(self, dtype):
        ckv = gather_pages(self.ckv, self.block_tables, self.layer).astype(dtype)
        krope = gather_pages(self.krope, self.block_tables, self.layer).astype(dtype)
        mask = jnp.arange(ckv.shape[1])[None, None, None, :] <= self.positions[:, None, :, None]  # [B,1,T,S]
        return ckv, krope, mask

    def attend_token(self, impl, q_lat, q_rope, *, scale):
        return attention_backend.paged_decode_attention(impl, q_lat, q_rope, self.ckv, self.krope, self.block_tables,
                                                        self.lengths, scale=scale, layer=self.layer)
