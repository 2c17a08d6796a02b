"""DeepSeek-V2: embedding → first_k_dense_replace dense layers → MoE layers → RMSNorm → untied lm_head.

Each group of identical layers is ONE module whose parameters carry a leading "layers" axis; the forward pass
scans over it, so compile time does not grow with depth. Training, prefill, decode and the paged serving step all
run this module (`forward`, with or without a cache).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.eager import compiled_when_eager
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

    def __call__(self, x, rope, *, cache=None, segment_ids=None, token_mask=None):
        """x [B,T,D] at rope = (cos, sin) [B,T,rope/2] → (x [B,T,D], cache, RouterStats | None).

        Training (cache None), prefill, decode and the paged serving step are all this call; a cache
        (model.layer_cache.LayerCache) decides where the new tokens' latents go and what they attend to.
        token_mask [B,T] marks real tokens (padding is left out of MoE routing).
        """
        a, cache = self.attn(self.attn_norm(x), rope, cache=cache, segment_ids=segment_ids)
        h, stats = self.feed_forward(x + a, token_mask)
        return h, cache, stats


def scan_layers(layers: nnx.Module, carry, fn: Callable, xs: Any = None, remat: str = "none", unroll: bool = False):
    """Runs fn(layer, carry, x) -> (carry, y) over the stacked layer module with jax.lax.scan (unroll: fully
    unrolled, see DeepseekV2.forward)."""
    graphdef, state = nnx.split(layers)

    def body(c, inp):
        st, x = inp
        return fn(nnx.merge(graphdef, materialize(st)), c, x)  # int8 / LoRA weights: this layer's only

    if remat != "none":
        # A loop keeps XLA from merging the recomputation with the forward; unrolled, only prevent_cse does.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=unroll)
    return jax.lax.scan(body, carry, (state, xs), unroll=unroll)


class DeepseekV2(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32):
        """Zero weights and unit norms: use `init_model`, `load_model` or a checkpoint restore for real ones."""
        self.config = cfg
        self.embed = param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        groups = {g.name: g for g in cfg.layer_groups()}
        stack = lambda name: (DecoderLayer(cfg, groups[name].moe, dtype, (groups[name].count,))  # noqa: E731
                              if name in groups else None)
        self.dense_layers = stack("dense_layers")
        self.moe_layers = stack("moe_layers")
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
        """(stacked layers, is_moe) for each of config.layer_groups(), in depth order."""
        return [(getattr(self, g.name), g.moe) for g in self.config.layer_groups()]

    @compiled_when_eager("remat", "unroll")
    def forward(self, input_ids, positions=None, *, cache=None, segment_ids=None, token_mask=None,
                remat: str = "none", unroll: bool = False):
        """input_ids int32 [B, T] at positions [B, T] (default 0..T-1) → (final hidden states [B, T, D] before
        the norm, cache, RouterStats of the MoE layers or None).

        segment_ids (packed sequences) restrict attention to equal ids. With a cache (LatentCache,
        PagedLatentCache.for_batch(...)) each layer stores the tokens' latents there and attends over it.
        unroll: compile the layer scans unrolled — no per-layer slicing of the stacked weights and stacking of
        residuals and gradients, at compile time growing with depth (the CPU trainer's default).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope = rope_tables(self.config, positions)
        h = self.embed_tokens(input_ids)
        stats = None
        for g, group in enumerate(self.config.layer_groups()):
            def step(layer, carry, i):
                x, view = carry
                x, view, st = layer(x, rope, cache=None if view is None else view.at(i), segment_ids=segment_ids,
                                    token_mask=token_mask)
                return (x, view), st
            view = None if cache is None else cache.group_view(g, positions)
            (h, view), out = scan_layers(getattr(self, group.name), (h, view), step,
                                         xs=None if cache is None else jnp.arange(group.count, dtype=jnp.int32),
                                         remat=remat, unroll=unroll)
            cache = None if cache is None else cache.with_group_view(g, view)
            if group.moe:
                stats = out
        return h, cache, stats

    @compiled_when_eager("return_aux", "remat", "unroll")  # eager calls: one compile per shape (eager.py)
    def __call__(self, input_ids, positions=None, segment_ids=None, *, token_mask=None, return_aux: bool = False,
                 remat: str = "none", unroll: bool = False):
        """input_ids int32 [B, T] → float32 logits [B, T, vocab] (and per-MoE-layer RouterStats if return_aux).

        positions default to 0..T-1; segment_ids (packed sequences) restrict attention to equal ids.
        """
        h, _, stats = self.forward(input_ids, positions, segment_ids=segment_ids, token_mask=token_mask,
                                   remat=remat, unroll=unroll)
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
