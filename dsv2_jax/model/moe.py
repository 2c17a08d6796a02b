"""DeepSeekMoE (DeepSeek-V2 §2.2): fp32 softmax gate, greedy / group-limited top-k, shared + routed experts.

Two interchangeable routed-expert paths (config `moe_impl`):
  * reference: every expert on every token, weighted by the (mostly zero) combine matrix — obviously right;
  * ragged: dropless; every (token, expert) copy through the grouped GEMM of `grouped_gemm.py`, whose cost
    follows the activated experts (backend: config `grouped_gemm`) — the fast path.
Under a mesh, `parallel.expert_parallel.use_mesh(model, mesh)` replaces them with the expert-parallel dispatch
(shard_map), which reuses `route` and runs its local experts through the same grouped GEMM; training and
sharded decode both get it that way. Every dispatch has the signature
`fn(x [N, D], routing, w_gate, w_up, w_down, gemm=...) -> [N, D]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv2_jax.config import ModelConfig
from dsv2_jax.ops.grouped_gemm import grouped_expert_mlp
from dsv2_jax.model.layers import MLP, param
from dsv2_jax.model.precision import param_dtype

# Logical axes of the stacked routed-expert weights: the parameters and the expert-parallel shard_map specs.
EXPERT_IN_AXES = ("expert", "embed", "expert_mlp")   # w_gate, w_up [E, D, F]
EXPERT_OUT_AXES = ("expert", "expert_mlp", "embed")  # w_down [E, F, D]


class Routing(NamedTuple):
    scores: jnp.ndarray   # [N, E] fp32 softmax affinities s_{i,t}
    experts: jnp.ndarray  # [N, K] int32 chosen experts
    weights: jnp.ndarray  # [N, K] fp32 gate values g_{i,t} (scaled or renormalised)


def route(cfg: ModelConfig, x: jnp.ndarray, w_router: jnp.ndarray) -> Routing:
    """x [N, D] → top-k experts per token. Gate math in fp32 whatever the compute dtype."""
    scores = jax.nn.softmax(x.astype(jnp.float32) @ w_router.astype(jnp.float32), axis=-1)
    select = scores
    if cfg.topk_method == "group_limited_greedy":
        # Device-limited routing: keep the topk_group groups holding the highest single-expert affinity.
        n, e = scores.shape
        grouped = scores.reshape(n, cfg.n_group, e // cfg.n_group)
        _, top_groups = jax.lax.top_k(grouped.max(axis=-1), cfg.topk_group)
        keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        select = jnp.where(keep[:, :, None], grouped, 0.0).reshape(n, e)
    weights, experts = jax.lax.top_k(select, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    else:
        weights = weights * cfg.routed_scaling_factor
    return Routing(scores, experts.astype(jnp.int32), weights)


class RouterStats(NamedTuple):
    """Per-sequence routing statistics from which every balance loss is computed (training.losses)."""
    counts: jnp.ndarray     # [B, E] number of (token, slot) assignments to each expert
    prob_sum: jnp.ndarray   # [B, E] Σ_t s_{i,t}
    num_tokens: jnp.ndarray  # [B] valid tokens
    group_tokens: jnp.ndarray  # [B, n_group] tokens with at least one expert in the group (device)


def router_stats(r: Routing, batch: int, token_mask: jnp.ndarray | None, n_group: int = 1) -> RouterStats:
    n, e = r.scores.shape
    valid = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.reshape(n).astype(jnp.float32)
    onehot = jax.nn.one_hot(r.experts, e, dtype=jnp.float32).sum(axis=1) * valid[:, None]
    in_group = (onehot.reshape(n, n_group, e // n_group).sum(-1) > 0).astype(jnp.float32)
    return RouterStats(onehot.reshape(batch, -1, e).sum(1),
                       (r.scores * valid[:, None]).reshape(batch, -1, e).sum(1),
                       valid.reshape(batch, -1).sum(1),
                       in_group.reshape(batch, -1, n_group).sum(1))


def experts_reference(x, r: Routing, w_gate, w_up, w_down, gemm: str = "auto") -> jnp.ndarray:
    """All experts on all tokens, combined with the dense [N, E] gate matrix (the oracle: `gemm` is unused)."""
    n, e = r.scores.shape
    combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], r.experts].add(r.weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w_gate)) * jnp.einsum("nd,edf->enf", x, w_up)
    y = jnp.einsum("enf,efd->end", h, w_down)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine).astype(x.dtype)


def experts_ragged(x, r: Routing, w_gate, w_up, w_down, gemm: str = "auto") -> jnp.ndarray:
    """All N*K (token, expert) copies through the grouped GEMM (backend `gemm`), then the gate-weighted sum
    over K."""
    n, k = r.experts.shape
    y = grouped_expert_mlp(x, r.experts.reshape(-1), w_gate, w_up, w_down, rows=jnp.arange(n * k) // k, impl=gemm)
    return jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1).astype(jnp.float32), r.weights).astype(x.dtype)


EXPERT_IMPLS = {"reference": experts_reference, "ragged": experts_ragged}


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, stack=()):
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg = cfg
        self.w_router = param((d, e), ("embed", "router"), param_dtype("w_router", dtype), stack)
        self.w_gate = param((e, d, f), EXPERT_IN_AXES, dtype, stack)
        self.w_up = param((e, d, f), EXPERT_IN_AXES, dtype, stack)
        self.w_down = param((e, f, d), EXPERT_OUT_AXES, dtype, stack)
        self.shared = MLP(d, cfg.shared_intermediate_size, dtype, stack) if cfg.n_shared_experts else None
        # How the routed experts run, a static attribute: this device's EXPERT_IMPLS[moe_impl] by default;
        # `expert_parallel.use_mesh` attaches the expert-parallel dispatch.
        self.dispatch = EXPERT_IMPLS[cfg.moe_impl]

    def __call__(self, x: jnp.ndarray, token_mask=None) -> tuple[jnp.ndarray, RouterStats]:
        """x [B, T, D] (token_mask [B, T] bool: tokens counted in the stats) → (y [B, T, D], RouterStats)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        r = route(self.cfg, flat, self.w_router[...])
        y = self.dispatch(flat, r, self.w_gate[...], self.w_up[...], self.w_down[...], gemm=self.cfg.grouped_gemm)
        y = y.reshape(b, t, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, router_stats(r, b, token_mask, self.cfg.n_group)
