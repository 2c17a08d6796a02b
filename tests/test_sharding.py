"""Mesh construction, the logical-axis rules table and batch placement (8 simulated CPU devices)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.transformer import abstract_model
from dsv2_jax.parallel.sharding import (BATCH_AXES, LOGICAL_RULES, MESH_AXES, batch_divisor, batch_spec, compute_spec,
                                        logical_to_spec, make_mesh, parse_mesh, shard_batch, tree_shardings, tree_specs)


def test_parse_mesh_and_errors():
    assert parse_mesh("data=2,expert=4") == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh(None) == dict.fromkeys(MESH_AXES, 1)
    with pytest.raises(ValueError, match="unknown axis"):
        parse_mesh("model=2")
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("data:2")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("data=16")


def test_every_logical_axis_of_the_model_has_a_rule():
    state = nnx.state(abstract_model(ModelConfig.preset("deepseek-v2")), nnx.Param)
    axes = {a for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
            for a in v.get_metadata()["axes"]}
    assert axes <= set(LOGICAL_RULES), axes - set(LOGICAL_RULES)


def test_param_specs_follow_the_rules_table():
    mesh = make_mesh("fsdp=2,tensor=2,expert=2")
    specs = tree_specs(nnx.state(abstract_model(ModelConfig.preset("tiny")), nnx.Param), mesh)
    moe = specs["moe_layers"]["mlp"]
    assert moe["w_gate"].get_value() == P(None, "expert", "fsdp", "tensor")
    assert moe["w_down"].get_value() == P(None, "expert", "tensor", "fsdp")
    assert moe["w_router"].get_value() == P(None, "fsdp", None)
    assert specs["embed"].get_value() == P("tensor", "fsdp")
    assert specs["moe_layers"]["attn"]["wo"].get_value() == P(None, "tensor", None, "fsdp")
    # A dimension the mesh axis does not divide stays replicated instead of failing.
    assert logical_to_spec(("vocab", "embed"), (7, 64), mesh) == P(None, "fsdp")


def test_state_shardings_place_arrays_and_one_device_works():
    for spec in ("", "data=2,expert=4"):
        mesh = make_mesh(spec)
        state = nnx.state(nnx.eval_shape(lambda: abstract_model(ModelConfig.preset("tiny"))), nnx.Param)
        shardings = tree_shardings(state, mesh)
        assert all(s.mesh is mesh for s in jax.tree.leaves(shardings))


def test_shard_batch_splits_rows_over_batch_axes():
    mesh = make_mesh("data=2,expert=4")
    batch = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    out = shard_batch(batch, mesh)["inputs"]
    assert out.sharding.spec == P(BATCH_AXES)
    assert {s.data.shape for s in out.addressable_shards} == {(1, 4)}
    np.testing.assert_array_equal(np.asarray(out), batch["inputs"])
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch({"inputs": np.zeros((6, 4), np.int32)}, mesh)


def test_compute_spec_gathers_fsdp_and_batch_spec_uses_the_mesh_axes():
    """What a layer computes with inside shard_map: fsdp-stored dims gathered; tokens over the batch axes the
    mesh has (a decode mesh may lack data / fsdp)."""
    mesh = make_mesh("fsdp=2,tensor=2,expert=2")
    assert compute_spec(("expert", "embed", "expert_mlp"), (8, 16, 12), mesh) == P("expert", None, "tensor")
    assert compute_spec(("expert", "expert_mlp", "embed"), (8, 12, 16), mesh) == P("expert", "tensor", None)
    assert batch_spec(mesh) == P(BATCH_AXES) and batch_divisor(mesh) == 4
    decode = jax.make_mesh((4, 2), ("tensor", "expert"), axis_types=(AxisType.Auto,) * 2)
    assert batch_spec(decode) == P(("expert",)) and batch_divisor(decode) == 2
