"""The MLA inference cache: per token per layer only the normalised latent c_KV and the post-RoPE shared key.

One (ckv [L, B, S, kv_lora_rank], krope [L, B, S, qk_rope_head_dim]) pair per layer group, stacked over the
group's layers exactly like its parameters, so a decode step scans the cache alongside the layer stack.
`lengths[b]` counts the valid tokens of row b; rows past it are garbage that attention masks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dsv2_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LatentCache:
    ckv: tuple[jnp.ndarray, ...]    # per layer group: [L_g, B, S, kv_lora_rank]
    krope: tuple[jnp.ndarray, ...]  # per layer group: [L_g, B, S, qk_rope_head_dim]
    lengths: jnp.ndarray            # [B] int32, tokens already cached per sequence

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> LatentCache:
        groups = [n for n in (cfg.num_dense_layers, cfg.num_moe_layers) if n]
        return cls(ckv=tuple(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype) for n in groups),
                   krope=tuple(jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype) for n in groups),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.ckv[0].shape[2]

    @property
    def dtype(self):
        return self.ckv[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: (kv_lora_rank + qk_rope_head_dim) · layers · itemsize · batch · max_len.

        The [B] lengths are not counted.
        """
        return sum(a.size * a.dtype.itemsize for a in (*self.ckv, *self.krope))

    def replace(self, **kw) -> LatentCache:
        return LatentCache(**{"ckv": self.ckv, "krope": self.krope, "lengths": self.lengths, **kw})

