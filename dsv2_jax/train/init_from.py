"""Start a training run from released weights: `dsv2 train --init-from DIR`.

DIR is an HF DeepSeek-V2 directory, a `dsv2 convert` output or a `dsv2 train` workdir (its newest step). The
weights are read by the one loader (`checkpoint.load.load_checkpoint`) straight into the shardings the mesh's logical-axis
rules give them; the optimizer state and the LR schedule start fresh at step 0. A workdir that already holds a
checkpoint is resumed instead (train.py checks that first and says so).

The model config comes from the checkpoint unless the train config names one; a named config must give every
parameter the checkpoint's shape, or one line says which parameter differs. Model configs may be presets, our
ModelConfig JSON, or an HF `config.json` (either dialect) — `resolve_model_config`, the one config resolver
(`dsv2 info` uses it too), reads all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv2_jax.config import ConfigError, ModelConfig, read_json_object

HF_MARKERS = ("model_type", "architectures", "rope_scaling", "rope_parameters", "torch_dtype")


def resolve_model_config(spec: str | Path) -> ModelConfig:
    """A preset name, a ModelConfig JSON, an HF config.json (any file name), a train config JSON (its model), or
    a checkpoint / run directory holding dsv2_config.json or config.json."""
    p = Path(spec)
    if p.is_dir():
        if (p / "dsv2_config.json").is_file():
            return ModelConfig.from_json(p / "dsv2_config.json")
        return ModelConfig.from_hf(p)
    if p.suffix == ".json" or len(p.parts) > 1:
        if not p.is_file():
            raise ConfigError(f"{p}: no such file or directory")
        d = read_json_object(p)
        if p.name == "config.json" or any(k in d for k in HF_MARKERS):
            return ModelConfig.from_hf(p)
        if "vocab_size" in d:
            return ModelConfig.from_json(p)
        from dsv2_jax.train.config import TrainConfig

        return TrainConfig.from_dict(d, source=str(p)).model_config()
    try:
        return ModelConfig.preset(str(spec))
    except ConfigError as e:
        raise ConfigError(f"{spec}: no such file or directory, and {e}") from None


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config stored with a checkpoint (dsv2_config.json, else the HF config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--init-from: checkpoint directory not found: {p}")
    return resolve_model_config(p)


def check_compatible(cfg: ModelConfig, ckpt_cfg: ModelConfig, source: str | Path) -> None:
    """Every parameter of `cfg` has the checkpoint's shape, or one line names the first that differs."""
    from dsv2_jax.checkpoint.convert import leaf_specs
    from dsv2_jax.checkpoint.orbax_io import param_name

    want, have = leaf_specs(cfg, jnp.float32), leaf_specs(ckpt_cfg, jnp.float32)
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise ConfigError(f"--init-from {source}: the model config has parameter '{param_name(path)}' "
                              "that the checkpoint lacks")
        if path not in want:
            raise ConfigError(f"--init-from {source}: checkpoint parameter '{param_name(path)}' has no place in "
                              "the model config")
        if want[path].shape != have[path].shape:
            raise ConfigError(f"--init-from {source}: parameter '{param_name(path)}' has shape "
                              f"{list(have[path].shape)} in the checkpoint, the model config implies "
                              f"{list(want[path].shape)}")


def load_params(path: str | Path, mesh, dtype="float32") -> nnx.State:
    """The checkpoint's parameters as an nnx.State, each leaf placed by the mesh's logical-axis rules."""
    from dsv2_jax.checkpoint.load import load_checkpoint

    return nnx.state(load_checkpoint(path, dtype, mesh=mesh))


def initial_state(trainer, path: str | Path) -> dict[str, Any]:
    """A fresh train state (step 0, new optimizer moments) around the checkpoint's weights (fp32 masters)."""
    check_compatible(trainer.cfg, checkpoint_config(path), path)
    params = load_params(path, trainer.mesh)
    shardings = trainer.state_shardings
    params = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(trainer.tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}


def tokenizer_path(tc) -> str | None:
    """The train config's tokenizer, else the init_from checkpoint's tokenizer.json (None: byte tokenizer)."""
    if tc.tokenizer is not None:
        return tc.tokenizer
    if tc.init_from and (Path(tc.init_from) / "tokenizer.json").is_file():
        return tc.init_from
    return None


def make_trainer(tc, mesh, cfg):
    """The full-parameter Trainer, or the LoraTrainer (frozen base from init_from) when lora_rank > 0."""
    from dsv2_jax.train.state import Trainer

    if tc.init_from:  # before anything is written
        check_compatible(cfg, checkpoint_config(tc.init_from), tc.init_from)
    if tc.lora_rank:
        from dsv2_jax.train.lora import LoraTrainer

        return LoraTrainer(tc, mesh, cfg)
    return Trainer(tc, mesh, cfg)
