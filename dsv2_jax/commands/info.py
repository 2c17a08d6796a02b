"""`dsv2 info CONFIG_OR_DIR`: parameter counts and latent KV-cache size of a preset, config file or checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from dsv2_jax.config import ModelConfig


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a ModelConfig JSON file, a converted / training directory, or an HF directory."""
    p = Path(spec)
    if (p / "dsv2_config.json").is_file():
        return ModelConfig.from_json(p / "dsv2_config.json")
    if p.is_dir() or p.name == "config.json":
        return ModelConfig.from_hf(p)
    if p.suffix == ".json":
        return ModelConfig.from_json(p)
    return ModelConfig.preset(spec)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameters (embedding and lm_head included, as the paper counts)."""
    from dsv2_jax.hf_checkpoint import hf_tensor_shapes

    total = active = 0
    routed_per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    for name, shape in hf_tensor_shapes(cfg).items():
        n = 1
        for s in shape:
            n *= s
        total += n
        if ".mlp.experts." not in name:
            active += n
    active += cfg.num_moe_layers * cfg.num_experts_per_tok * routed_per_expert
    return {"total": total, "active": active}


def run(args) -> int:
    cfg = resolve_config(args.config)
    counts = parameter_counts(cfg)
    info = {"total_params": counts["total"], "active_params": counts["active"],
            "layers": cfg.num_hidden_layers, "moe_layers": cfg.num_moe_layers,
            "latent_cache_elems_per_token": cfg.latent_cache_dim * cfg.num_hidden_layers,
            "mha_cache_elems_per_token": 2 * cfg.num_attention_heads * cfg.v_head_dim * cfg.num_hidden_layers}
    if args.quantize or args.device_gb:
        from dsv2_jax.quantize import memory_report

        info["memory"] = memory_report(cfg, args.quantize, device_bytes=(args.device_gb or 24) * 1e9)
    print(json.dumps(info, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and KV-cache size of a config")
    p.add_argument("config", help="preset name (tiny, deepseek-v2, deepseek-v2-lite), config JSON or HF dir")
    p.add_argument("--quantize", choices=("int8",), help="report int8 weight bytes (and what cache fits)")
    p.add_argument("--device-gb", type=float, help="accelerator memory for the fit estimate (default 24)")
    p.set_defaults(func=run)
