"""dsv2-jax: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in JAX / Flax NNX."""

from dsv2_jax.config import ConfigError, ModelConfig
from dsv2_jax.checkpoint.load import load_checkpoint
from dsv2_jax.infer.engine import DecodeEngine, generate
from dsv2_jax.model.transformer import DeepseekV2, abstract_model, init_model
from dsv2_jax.checkpoint.safetensors_io import CheckpointError


def load_model(path, dtype="float32", *, mesh=None, shardings=None, quantize=None, **config_overrides) -> DeepseekV2:
    """Loads a model from an HF DeepSeek-V2 directory (config.json + safetensors, single or sharded), a
    directory written by `dsv2 convert` (Orbax params/ + dsv2_config.json) or a `dsv2 train` workdir.

    `dtype` ("float32" | "bfloat16") is the parameter and compute dtype; the MoE router stays fp32.
    `mesh` places parameters by the logical-axis rules in `sharding.LOGICAL_RULES` (each device reads only its
    own shard of an Orbax checkpoint) and runs the MoE layers expert-parallel over it (`expert_parallel.use_mesh`);
    `shardings` (a pure dict of shardings) overrides the placement.
    `config_overrides` set implementation fields such as moe_impl="reference" or attention_impl="xla".
    `quantize="int8"`: weight-only int8 projections with per-channel scales, computed in `dtype` (quantize.py).
    A LoRA run directory (lora.json, lora.py) loads its base with the newest adapters merged in.
    """
    if quantize is not None:
        from dsv2_jax.infer.quantize import load_quantized

        return load_quantized(path, dtype, quantize, mesh=mesh, **config_overrides)
    from dsv2_jax.train.lora import is_lora_run, load_lora_model

    if is_lora_run(path):
        return load_lora_model(path, dtype, mesh=mesh, **config_overrides)
    return load_checkpoint(path, dtype, mesh=mesh, shardings=shardings, **config_overrides)


__all__ = ["CheckpointError", "ConfigError", "DecodeEngine", "DeepseekV2", "ModelConfig", "abstract_model", "generate",
           "init_model", "load_model"]
