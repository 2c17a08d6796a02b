"""Loading a model: the one reader behind `dsv2_jax.load_model`, for every kind of checkpoint directory.

  * an HF directory (config.json + model.safetensors or a sharded index): tensors mapped through
    hf_checkpoint's table and placed on their devices as they are read (one stacked parameter at a time);
  * a `dsv2 convert` output (params/ Orbax + dsv2_config.json): a plain Orbax restore, each device reading only
    its own shard;
  * a `dsv2 train` workdir (checkpoints/ + dsv2_config.json): the newest step's parameters only.
Parameter dtypes follow `model.precision` (the router stays fp32). With a mesh, parameters are placed by
`sharding.LOGICAL_RULES` and the MoE layers get the expert-parallel dispatch (`expert_parallel.use_mesh`), so
sharded decode runs its experts the way training does.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dsv2_jax.checkpoint.convert import MODEL_CONFIG_FILE, PARAMS_DIR, is_orbax_dir, is_training_run
from dsv2_jax.checkpoint.hf_checkpoint import check_tensors, params_from_hf, resolve_dtype
from dsv2_jax.checkpoint.orbax_io import abstract_targets, restore_tree
from dsv2_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from dsv2_jax.checkpoint.train_checkpoints import latest_state_dir
from dsv2_jax.config import ModelConfig
from dsv2_jax.model.transformer import DeepseekV2, abstract_model
from dsv2_jax.parallel.expert_parallel import use_mesh
from dsv2_jax.parallel.sharding import tree_shardings


def load_checkpoint(path: str | os.PathLike, dtype="float32", *, mesh=None, shardings=None,
                    **config_overrides) -> DeepseekV2:
    """A model from an HF directory, a converted Orbax directory (`params/_METADATA`) or a `dsv2 train` workdir
    (`checkpoints/`, newest step's parameters), parameters in `dtype` ("float32" | "bfloat16" | "float16").

    With `mesh`, parameters are placed by the logical-axis rules of `sharding.LOGICAL_RULES` (mesh axes among
    data/fsdp/expert/tensor; missing ones count as size 1) and MoE layers dispatch expert-parallel over it; or
    pass `shardings`, a pure dict of jax.sharding.Sharding shaped like the parameter tree. From an Orbax
    directory each device reads only its own shard. `config_overrides` set ModelConfig implementation fields.
    """
    dtype, path = resolve_dtype(dtype), Path(path)
    orbax = is_orbax_dir(path)
    cfg = (ModelConfig.from_json(path / MODEL_CONFIG_FILE).replace(**config_overrides) if orbax
           else ModelConfig.from_hf(path, **config_overrides))
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    if shardings is None and mesh is not None:
        shardings = nnx.to_pure_dict(tree_shardings(state, mesh))
    if not orbax:
        state.replace_by_pure_dict(_hf_params(path, cfg, dtype, shardings))
    else:
        target = abstract_targets(state, shardings)
        state.replace_by_pure_dict(_run_params(path, target) if is_training_run(path)
                                   else restore_tree(path / PARAMS_DIR, target))
    return use_mesh(nnx.merge(graphdef, state), mesh)


def _hf_params(path: Path, cfg: ModelConfig, dtype, shardings: dict | None) -> dict:
    """The HF directory's tensors, validated against `cfg` first, as the model's pure parameter dict."""
    ckpt = SafetensorsCheckpoint(path)
    try:
        check_tensors(ckpt, cfg)
        return params_from_hf(ckpt, cfg, dtype, shardings)
    finally:
        ckpt.close()


def _run_params(workdir: Path, target: dict) -> dict:
    """The newest checkpoint's parameters only (no optimizer state), restored into `target` (a pure dict of
    ShapeDtypeStructs with shardings and the dtypes wanted)."""
    item = {"params": jax.tree.map(lambda s: {"value": s}, target)}  # partial_restore skips opt_state and step
    restored = ocp.PyTreeCheckpointer().restore(
        latest_state_dir(workdir),
        args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                    partial_restore=True))
    return jax.tree.map(lambda v: v["value"], restored["params"], is_leaf=lambda x: isinstance(x, dict) and "value" in x)
