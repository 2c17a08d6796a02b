"""DeepSeek-V2: embedding → first_k_dense_replace dense layers → MoE layers → RMSNorm → untied lm_head.

Each group of identical layers is ONE module whose parameters carry a leading "layers" axis; the forward pass
scans over it, so compile time does not grow with depth. Training, prefill and decode all run this module.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.layers import MLP, RMSNorm, param
from dsv2_jax.model.lazy_params import materialize
from dsv2_jax.model.mla import MLA
from dsv2_jax.model.moe import MoE, RouterStats
from dsv2_jax.model.rope import rope_tables

INIT_STD = 0.02  # HF initializer_range
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, dtype, stack=()):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed", stack)
        self.attn = MLA(cfg, dtype, stack)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed", stack)
        self.mlp = MoE(cfg, dtype, stack) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, stack)

    def feed_forward(self, h, token_mask) -> tuple[jnp.ndarray, RouterStats | None]:
        x = self.mlp_norm(h)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(x, token_mask)
            return h + y, stats
        return h + self.mlp(x), None

    def __call__(self, x, cos, sin, segment_ids=None, token_mask=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, segment_ids)
        return self.feed_forward(h, token_mask)

    def decode(self, x, cos, sin, cache_ckv, cache_krope, layer, lengths):
        """One cached decode step of this layer (see MLA.decode): returns (h, cache_ckv, cache_krope)."""
        a, cache_ckv, cache_krope = self.attn.decode(self.attn_norm(x), cos, sin, cache_ckv, cache_krope, layer,
                                                     lengths)
        h, _ = self.feed_forward(x + a, None)
        return h, cache_ckv, cache_krope


def scan_layers(layers: nnx.Module, carry, fn: Callable, xs: Any = None, remat: str = "none"):
    """Runs fn(layer, carry, x) -> (carry, y) over the stacked layer module with jax.lax.scan."""
    graphdef, state = nnx.split(layers)

    def body(c, inp):
        st, x = inp
        return fn(nnx.merge(graphdef, materialize(st)), c, x)  # int8 / LoRA weights: this layer's only

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))


class DeepseekV2(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32):
        """Zero weights and unit norms: use `init_model`, `load_model` or a checkpoint restore for real ones."""
        self.config = cfg
        self.embed = param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.dense_layers = (DecoderLayer(cfg, False, dtype, (cfg.num_dense_layers,))
                             if cfg.num_dense_layers else None)
        self.moe_layers = DecoderLayer(cfg, True, dtype, (cfg.num_moe_layers,)) if cfg.num_moe_layers else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.lm_head = param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    @property
    def dtype(self):
        return self.embed.value.dtype

    def embed_tokens(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.embed[...], input_ids, axis=0)

    def logits(self, h: jnp.ndarray) -> jnp.ndarray:
        return jnp.einsum("btd,dv->btv", self.norm(h), self.lm_head[...], preferred_element_type=jnp.float32)

    def layer_groups(self):
        """(stacked layers, is_moe) for each non-empty group, in depth order."""
        return [(g, moe) for g, moe in ((self.dense_layers, False), (self.moe_layers, True)) if g is not None]

    def __call__(self, input_ids, positions=None, segment_ids=None, *, token_mask=None, return_aux: bool = False,
                 remat: str = "none"):
        """input_ids int32 [B, T] → float32 logits [B, T, vocab] (and per-MoE-layer RouterStats if return_aux).

        positions default to 0..T-1; segment_ids (packed sequences) restrict attention to equal ids.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_tables(self.config, positions)
        h = self.embed_tokens(input_ids)
        stats = None
        for layers, is_moe in self.layer_groups():
            def step(layer, x, _):
                return layer(x, cos, sin, segment_ids, token_mask)
            h, out = scan_layers(layers, h, step, remat=remat)
            if is_moe:
                stats = out
        logits = self.logits(h)
        return (logits, stats) if return_aux else logits


def random_state(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = INIT_STD) -> nnx.State:
    """Random parameters as a traceable function of `key`: jit it with out_shardings and every device draws only
    its own shards (training from scratch at scale). Weights ~ normal(0, std), norm scales 1."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    keys = dict(zip((p for p, _ in leaves), jax.random.split(key, len(leaves))))

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return (std * jax.random.normal(keys[path], leaf.shape, jnp.float32)).astype(leaf.dtype)

    state.replace_by_pure_dict(jax.tree.map_with_path(draw, nnx.to_pure_dict(state)))
    return state


def init_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = INIT_STD) -> DeepseekV2:
    """A random model on the host, deterministic in `seed` (tests, notebooks, small experiments).

    Drawn with numpy: XLA:CPU takes ~1 s per parameter shape to compile threefry (see random_state for the
    sharded on-device init used by training).
    """
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray((std * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype))

    state.replace_by_pure_dict(jax.tree.map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> DeepseekV2:
    """Shapes and dtypes only: no memory is allocated (used to restore or load into)."""
    return nnx.eval_shape(lambda: DeepseekV2(cfg, dtype=dtype))
