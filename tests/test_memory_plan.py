"""dsv2_jax.parallel.memory_plan against XLA's own memory analysis of the compiled train step (CPU, small configs)."""

import json

import jax
import jax.numpy as jnp
import pytest

from dsv2_jax.cli import main
from dsv2_jax.config import ModelConfig
from dsv2_jax.parallel.memory_plan import ATTENTION_IMPLS, activation_bytes, memory_plan
from dsv2_jax.parallel.sharding import make_mesh
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.train.state import BATCH_KEYS, Trainer

CFG = ModelConfig.preset("tiny")


def xla_bytes(mesh_spec: str, seq_len: int, batch: int, remat: str) -> int:
    """Per-device bytes XLA allocates for the compiled step: arguments + temporaries + non-aliased outputs."""
    # The plan models the scanned layer stack accelerators run (the CPU step unrolls it by default).
    tc = TrainConfig(seq_len=seq_len, global_batch=batch, remat=remat, mesh=mesh_spec, compute_dtype="float32",
                     unroll_layers=False)
    trainer = Trainer(tc, make_mesh(mesh_spec), CFG)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state,
                         trainer.state_shardings)
    batch_args = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=trainer.batch_sharding)
                  for k in BATCH_KEYS}
    ma = trainer.step.lower(state, batch_args).compile().memory_analysis()
    return (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
            - ma.alias_size_in_bytes)


@pytest.mark.parametrize("mesh_spec,remat", [("", "none"), ("data=2", "full")])
def test_plan_agrees_with_xla_memory_analysis(mesh_spec, remat):
    seq_len, batch = 128, 4
    plan = memory_plan(CFG, mesh_spec, seq_len, batch, remat, compute_dtype="float32", attention="xla")
    xla = xla_bytes(mesh_spec, seq_len, batch, remat)
    print(f"mesh={mesh_spec or 'single'} remat={remat}: plan {plan.train_total} B, XLA {xla} B, "
          f"ratio {plan.train_total / xla:.3f}")
    assert abs(plan.train_total / xla - 1) < 0.10
    # The state itself is exact: fp32 params (sharded by LOGICAL_RULES) + two AdamW moments.
    assert plan.optimizer == pytest.approx(2 * plan.params, rel=1e-3)


def test_sharding_divides_the_state_and_remat_shrinks_activations():
    one = memory_plan(CFG, "", 64, 8, "none", attention="xla")
    fsdp = memory_plan(CFG, "fsdp=4,expert=2", 64, 8, "none", attention="xla")
    full = memory_plan(CFG, "fsdp=4,expert=2", 64, 8, "full", attention="xla")
    assert fsdp.params < one.params / 3  # embed-sharded over fsdp, experts over expert (norms replicated)
    assert full.activations < fsdp.activations
    assert fsdp.cache == one.cache // 8  # batch split over fsdp x expert


def test_flash_attention_plan_has_no_quadratic_term():
    """Planned for the kernels (default), activations grow linearly in seq_len; XLA attention's grow faster."""
    acts = lambda impl, t: activation_bytes(CFG.replace(attention_impl=impl), 1, t, "full", jnp.bfloat16)
    flash, xla = ([acts(ATTENTION_IMPLS[a], t) for t in (256, 1024)] for a in ("flash", "xla"))
    assert flash[1] < 4.5 * flash[0] and xla[1] > 6 * xla[0]


def test_info_prints_the_plan(capsys):
    assert main(["info", "tiny", "--mesh", "data=2", "--seq-len", "64", "--batch", "4", "--remat", "full"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["memory_per_device_bytes"]["full"]
    assert plan["mesh"]["data"] == 2 and plan["train_total"] > plan["params"] > 0 and plan["cache"] > 0
