"""The paged MLA latent cache: one preallocated pool of fixed-size pages per layer group.

Each page holds `page_size` tokens' normalised c_KV and post-RoPE k_rope for every layer of its group, stacked like
the group's parameters (ckv [L_g, P, page, kv_lora_rank], krope [L_g, P, page, qk_rope_head_dim]). A sequence owns
a list of page ids (its block table); token t lives at (table[t // page], t % page). Page 0 is never handed out:
padding tokens of a bucketed batch write there, so no real page is ever touched by padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dsv2_jax.config import ModelConfig

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
class PagedLatentCache:
    ckv: tuple[jnp.ndarray, ...]    # per layer group: [L_g, P, page, kv_lora_rank]
    krope: tuple[jnp.ndarray, ...]  # per layer group: [L_g, P, page, qk_rope_head_dim]

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_pages: int, page_size: int = 64, dtype=jnp.bfloat16,
              sharding=None) -> PagedLatentCache:
        """An empty pool; `sharding` (e.g. replicated over a mesh: the latent is shared by all heads) places it."""
        groups = [n for n in (cfg.num_dense_layers, cfg.num_moe_layers) if n]

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

    @property
    def dtype(self):
        return self.ckv[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (*self.ckv, *self.krope))
