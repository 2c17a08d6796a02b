"""Training losses: next-token cross-entropy over packed rows, and DeepSeek-V2's three balance losses (§2.2.3).

For each MoE layer and each sequence (one packed row) with T valid tokens, N routed experts, K chosen per token,
D device groups (= the router's n_group) of which at most M (= topk_group) are used per token:
  expert-level         L1 = Σ_i f_i P_i,     f_i = N/(K·T) · count_i,    P_i = (1/T) Σ_t s_{i,t}
  device-level         L2 = Σ_d f'_d P'_d,   f'_d = mean_{i∈d} f_i,      P'_d = Σ_{i∈d} P_i
  communication        L3 = Σ_d f''_d P''_d, f''_d = D/(M·T) · #tokens sent to d,  P''_d = Σ_{i∈d} P_i
Each is averaged over sequences and summed over layers (the reference adds one auxiliary loss per layer), then
weighted by the config's aux_loss_alpha (α1), device_aux_loss_alpha (α2), comm_aux_loss_alpha (α3).
Perfect balance gives L1 = L2 = L3 = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.moe import RouterStats

BALANCE_TERMS = ("expert_balance", "device_balance", "comm_balance")


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray) -> jnp.ndarray:
    """Mean negative log-likelihood over positions with loss_mask > 0 (fp32). logits [B,T,V], targets [B,T]."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def balance_terms(stats: RouterStats, cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """The unweighted L1, L2, L3 from stacked RouterStats [L, B, ...] (layers, sequences)."""
    n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    d, m = cfg.n_group, cfg.topk_group
    t = stats.num_tokens[..., None]                          # [L, B, 1]
    has_tokens = (stats.num_tokens > 0).astype(jnp.float32)  # all-padding rows do not count
    t = jnp.maximum(t, 1.0)
    f = n / (k * t) * stats.counts                           # [L, B, N]
    p = stats.prob_sum / t
    f_group = f.reshape(*f.shape[:-1], d, n // d)
    p_group = p.reshape(*p.shape[:-1], d, n // d).sum(-1)    # P'_d = P''_d
    per_seq = {
        "expert_balance": jnp.sum(f * p, -1),
        "device_balance": jnp.sum(f_group.mean(-1) * p_group, -1),
        "comm_balance": jnp.sum(d / (m * t) * stats.group_tokens * p_group, -1),
    }
    n_seq = jnp.maximum(has_tokens.sum(-1), 1.0)             # [L]
    return {name: jnp.sum(jnp.sum(v * has_tokens, -1) / n_seq) for name, v in per_seq.items()}


def balance_weights(cfg: ModelConfig) -> np.ndarray:
    """[3] float32 (α1, α2, α3), in BALANCE_TERMS order."""
    return np.asarray([cfg.aux_loss_alpha, cfg.device_aux_loss_alpha, cfg.comm_aux_loss_alpha], np.float32)


def balance_loss(stats: RouterStats | None, cfg: ModelConfig,
                 weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """(α1·L1 + α2·L2 + α3·L3, the unweighted terms for logging). No MoE layers → zero. `weights` [3]: the α
    as a traced value (the train step takes them as an argument, so runs that differ only in them share one
    compiled step); default the config's."""
    if stats is None:
        zero = jnp.zeros((), jnp.float32)
        return zero, dict.fromkeys(BALANCE_TERMS, zero)
    terms = balance_terms(stats, cfg)
    alphas = balance_weights(cfg) if weights is None else weights
    total = sum(alphas[i] * terms[name] for i, name in enumerate(BALANCE_TERMS))
    return total, terms


def expert_load(stats: RouterStats | None) -> jnp.ndarray | None:
    """[L, E] fraction of the routed copies each expert received in the batch (uniform = 1/E)."""
    if stats is None:
        return None
    counts = stats.counts.sum(1)
    return counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
