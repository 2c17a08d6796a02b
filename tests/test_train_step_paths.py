"""The CPU train step's fast formulations equal the plain ones: the single-contraction XLA attention (forward and
gradients), the unrolled layer scans (loss and gradients), and clipping by one scalar factor (optax's result and
state structure, which checkpoints depend on)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv2_jax.config import ConfigError
from dsv2_jax.model.transformer import init_model
from dsv2_jax.ops.attention_backend import lowering_platform, xla_attention
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.losses import balance_loss, cross_entropy
from dsv2_jax.train.schedule import clip_by_global_norm, learning_rate, make_optimizer
from dsv2_jax.train.state import unroll_layers
from kernels_pallas.reference import attention_mask, masked_softmax
from tests.train_fixtures import TEST_MODEL, make_batch, make_test_config


def split_rope_attention(q_nope, q_rope, k_nope, k_rope, v, mask, scale):
    """The textbook MLA scores: a per-head nope product plus a head-shared rope product."""
    scores = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope) + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope))
    return jnp.einsum("bhts,bshv->bthv", masked_softmax(scores * scale, mask), v)


def test_xla_attention_equals_split_rope_scores_with_gradients():
    b, t, h, n, r, dv = 2, 12, 3, 8, 4, 6
    keys = jax.random.split(jax.random.key(0), 6)
    args = (jax.random.normal(keys[0], (b, t, h, n)), jax.random.normal(keys[1], (b, t, h, r)),
            jax.random.normal(keys[2], (b, t, h, n)), jax.random.normal(keys[3], (b, t, r)),
            jax.random.normal(keys[4], (b, t, h, dv)))
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)  # packed rows, padding
    mask, w = attention_mask(t, seg), jax.random.normal(keys[5], (b, t, h, dv))

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, mask, 0.3) * w)
    got, want = (jax.value_and_grad(loss(fn), argnums=range(5))(*args)
                 for fn in (xla_attention, split_rope_attention))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, e in zip(got[1], want[1]):  # dk_rope sums over heads, as the shared key's gradient must
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_unrolled_layer_scans_equal_the_scan():
    """Loss and gradients of 2 MoE layers (a real loop, stacked router stats): unrolled == scanned."""
    tc = make_test_config(model_overrides={**TEST_MODEL, "first_k_dense_replace": 0, "moe_impl": "reference"})
    assert unroll_layers(tc) and not unroll_layers(tc.replace(unroll_layers=False))  # default: unrolled on CPU,
    assert not unroll_layers(tc.replace(remat="full"))  # ... unless remat asks to save memory,
    with lowering_platform("tpu"):
        assert not unroll_layers(tc)  # ... or the step is exported for an accelerator
    cfg = tc.model_config()
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    batch = make_batch(0, 4, 16)

    def loss(params, unroll):
        logits, stats = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"],
                                                    token_mask=batch["segment_ids"] > 0, return_aux=True,
                                                    unroll=unroll)
        return cross_entropy(logits, batch["targets"], batch["loss_mask"]) + balance_loss(stats, cfg)[0]
    (got, got_grads), (want, want_grads) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, u)
                                            for u in (True, False))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [0.1, 10.0])  # global norm below and above max_norm
def test_clip_by_global_norm_equals_optax(scale):
    keys = jax.random.split(jax.random.key(1), 3)
    grads = {"a": scale * jax.random.normal(keys[0], (7, 5)), "b": [scale * jax.random.normal(keys[1], (3,)),
                                                                   scale * jax.random.normal(keys[2], (2, 2, 4))]}
    ours, ref = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    got, state = ours.update(grads, ours.init(grads))
    want, want_state = ref.update(grads, ref.init(grads))
    assert jax.tree.structure((got, state)) == jax.tree.structure((want, want_state))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, grads)  # norm 0: passed through, no 0/0
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(ours.update(zero, state)[0]))


def test_optimizer_state_keeps_optax_structure():
    """Checkpoints hold the opt_state: same tree as optax's clip_by_global_norm + adamw chain."""
    tc = TrainConfig()
    params = {"w": jnp.ones((3, 2)), "s": jnp.ones((2,))}
    reference = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                            optax.adamw(learning_rate(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
    assert jax.tree.structure(make_optimizer(tc).init(params)) == jax.tree.structure(reference.init(params))


def test_unroll_layers_must_be_a_bool_or_null():
    assert TrainConfig(unroll_layers=False).unroll_layers is False
    with pytest.raises(ConfigError, match="unroll_layers"):
        TrainConfig().with_overrides(["unroll_layers=1"])
