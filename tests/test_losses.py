"""Cross-entropy over packed rows and the three balance losses against a direct numpy evaluation of the paper's
formulas, token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import moe
from dsv2_jax.config import ModelConfig
from dsv2_jax.train.losses import BALANCE_TERMS, balance_loss, balance_terms, cross_entropy, expert_load


def test_cross_entropy_matches_numpy_and_ignores_masked():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), targets, mask), expected, rtol=1e-6)
    # Changing a masked position's logits does not change the loss.
    logits[0, 2] += 100.0
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), targets, mask), expected, rtol=1e-6)


def numpy_balance(scores, experts, valid, cfg):
    """Per layer, per sequence, straight from the definitions; averaged over sequences, summed over layers."""
    n_exp, k, d, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    per = n_exp // d
    out = dict.fromkeys(BALANCE_TERMS, 0.0)
    for layer in range(scores.shape[0]):
        acc = dict.fromkeys(BALANCE_TERMS, 0.0)
        n_seq = 0
        for b in range(scores.shape[1]):
            toks = [t for t in range(scores.shape[2]) if valid[b, t]]
            if not toks:
                continue
            n_seq += 1
            t_len = len(toks)
            f = np.zeros(n_exp)
            sent = np.zeros(d)
            for t in toks:
                chosen = experts[layer, b, t]
                for i in chosen:
                    f[i] += n_exp / (k * t_len)
                for g in {int(i) // per for i in chosen}:
                    sent[g] += d / (m * t_len)
            p = scores[layer, b, toks].mean(0)
            p_dev = p.reshape(d, per).sum(-1)
            acc["expert_balance"] += (f * p).sum()
            acc["device_balance"] += (f.reshape(d, per).mean(-1) * p_dev).sum()
            acc["comm_balance"] += (sent * p_dev).sum()
        for name in BALANCE_TERMS:
            out[name] += acc[name] / n_seq
    return out


def test_balance_losses_match_the_formulas():
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)
    layers, b, t, dim = 2, 3, 6, 16
    rng = np.random.default_rng(1)
    valid = np.ones((b, t), bool)
    valid[1, 4:] = False
    valid[2] = False  # an all-padding row does not count as a sequence
    stats, scores, experts = [], [], []
    for layer in range(layers):
        x = jnp.asarray(rng.normal(size=(b * t, dim)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(dim, 8)), jnp.float32)
        r = moe.route(cfg, x, w)
        stats.append(moe.router_stats(r, b, jnp.asarray(valid), cfg.n_group))
        scores.append(np.asarray(r.scores).reshape(b, t, 8))
        experts.append(np.asarray(r.experts).reshape(b, t, 3))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
    got = balance_terms(stacked, cfg)
    want = numpy_balance(np.stack(scores), np.stack(experts), valid, cfg)
    for name in BALANCE_TERMS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    total, _ = balance_loss(stacked, cfg)
    np.testing.assert_allclose(total, cfg.aux_loss_alpha * want["expert_balance"]
                               + cfg.device_aux_loss_alpha * want["device_balance"]
                               + cfg.comm_aux_loss_alpha * want["comm_balance"], rtol=1e-5)
    load = np.asarray(expert_load(stacked))
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("alpha", [(0.001, 0.0, 0.0), (0.003, 0.05, 0.02)])
def test_perfect_balance_is_one_and_alphas_weight(alpha):
    cfg = ModelConfig.preset("tiny").replace(aux_loss_alpha=alpha[0], device_aux_loss_alpha=alpha[1],
                                             comm_aux_loss_alpha=alpha[2])
    e, g = cfg.n_routed_experts, cfg.n_group
    t = 8  # each token picks one expert in each of topk_group=2 groups; every expert gets 2 copies
    stats = moe.RouterStats(counts=jnp.full((1, 1, e), t * 2 / e), prob_sum=jnp.full((1, 1, e), t / e),
                            num_tokens=jnp.full((1, 1), t), group_tokens=jnp.full((1, 1, g), t * 2 / g))
    total, terms = balance_loss(stats, cfg)
    for name in BALANCE_TERMS:
        np.testing.assert_allclose(terms[name], 1.0, rtol=1e-6)
    np.testing.assert_allclose(total, sum(alpha), rtol=1e-6)
