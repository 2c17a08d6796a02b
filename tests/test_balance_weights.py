"""The balance-loss weights (α1, α2, α3) reach the train step as an argument, not as constants: runs that differ
only in them (the moe_routing notebook trains with and without them) lower to one program, so they share one
compilation (the persistent cache keys on the program), and the traced weights weight the terms as the config's."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import LITE_STYLE
from dsv2_jax.config import ModelConfig
from dsv2_jax.model.moe import RouterStats
from dsv2_jax.parallel.sharding import make_mesh
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.losses import balance_loss, balance_weights
from dsv2_jax.train.state import BATCH_KEYS, Trainer

CFG = ModelConfig.from_hf(dict(LITE_STYLE))
NO_BALANCE = dict(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)


def test_steps_differing_only_in_balance_weights_are_one_program():
    tc = TrainConfig(seq_len=16, global_batch=2, compute_dtype="float32", unroll_layers=False)
    texts, weights = [], []
    for cfg in (CFG, CFG.replace(**NO_BALANCE)):
        trainer = Trainer(tc, make_mesh(""), cfg)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             trainer.abstract_state, trainer.state_shardings)
        batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32, sharding=trainer.batch_sharding) for k in BATCH_KEYS}
        texts.append(trainer.step.lower(state, batch).as_text())
        weights.append(trainer.balance_weights)
    assert texts[0] == texts[1]  # were the weights constants, the two programs would differ
    np.testing.assert_allclose(weights[0], [CFG.aux_loss_alpha, CFG.device_aux_loss_alpha,
                                            CFG.comm_aux_loss_alpha], rtol=1e-7)
    np.testing.assert_array_equal(weights[1], 0.0)


def test_traced_weights_equal_the_config_constants():
    rng = np.random.default_rng(0)
    e, g = 8, 4
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=e, num_experts_per_tok=2, n_group=g, topk_group=2)
    stats = RouterStats(counts=jnp.asarray(rng.integers(0, 6, (2, 3, e)), jnp.float32),
                        prob_sum=jnp.asarray(rng.uniform(0, 2, (2, 3, e)), jnp.float32),
                        num_tokens=jnp.full((2, 3), 8.0), group_tokens=jnp.asarray(rng.integers(0, 8, (2, 3, g)),
                                                                                     jnp.float32))
    traced = jax.jit(lambda w: balance_loss(stats, cfg, w)[0])
    for alpha in [(0.003, 0.05, 0.02), (0.5, 0.0, 2.0), (0.0, 0.0, 0.0)]:
        c = cfg.replace(aux_loss_alpha=alpha[0], device_aux_loss_alpha=alpha[1], comm_aux_loss_alpha=alpha[2])
        want, terms = balance_loss(stats, c)
        np.testing.assert_allclose(traced(balance_weights(c)), want, rtol=1e-6)
        np.testing.assert_allclose(want, sum(a * terms[k] for a, k in zip(alpha, terms)), rtol=1e-6)
    assert traced._cache_size() == 1
