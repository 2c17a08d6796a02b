"""`dsv2 info CONFIG_OR_DIR`: parameter counts and latent KV-cache size of a preset, config file or checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from dsv2_jax.config import ModelConfig
from dsv2_jax.train.init_from import resolve_model_config


def load_train_config(spec: str):
    from dsv2_jax.train.config import TrainConfig

    return TrainConfig.load(spec)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameters (embedding and lm_head included, as the paper counts)."""
    from dsv2_jax.checkpoint.hf_checkpoint import hf_tensor_shapes

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
    cfg = resolve_model_config(args.config)
    counts = parameter_counts(cfg)
    info = {"total_params": counts["total"], "active_params": counts["active"],
            "layers": cfg.num_hidden_layers, "moe_layers": cfg.num_moe_layers,
            "latent_cache_elems_per_token": cfg.latent_cache_dim * cfg.num_hidden_layers,
            "mha_cache_elems_per_token": 2 * cfg.num_attention_heads * cfg.v_head_dim * cfg.num_hidden_layers}
    if args.config.endswith(".json") and Path(args.config).is_file():
        tc = load_train_config(args.config)
        if tc.model != args.config:  # a train config: what one run of it processes
            info["train"] = {"model": tc.model, "steps": tc.steps, "seq_len": tc.seq_len,
                             "global_batch": tc.global_batch, "tokens": tc.steps * tc.seq_len * tc.global_batch}
    if args.mesh is not None or args.seq_len is not None or args.batch is not None:
        from dsv2_jax.parallel.memory_plan import memory_plan

        info["memory_per_device_bytes"] = {
            remat: memory_plan(cfg, args.mesh, args.seq_len or 4096, args.batch or 1, remat,
                               attention=args.attention).as_dict()
            for remat in args.remat}
    if args.quantize or args.device_gb:
        from dsv2_jax.infer.quantize import memory_report

        info["memory"] = memory_report(cfg, args.quantize, device_bytes=(args.device_gb or 24) * 1e9)
    print(json.dumps(info, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, KV-cache size and per-device memory plan of a config")
    p.add_argument("config", help="preset name (tiny, deepseek-v2, deepseek-v2-lite), model or train config JSON, "
                                  "HF dir, `dsv2 convert` output or `dsv2 train` workdir")
    p.add_argument("--mesh", help="plan per-device memory on this mesh, e.g. 'fsdp=8,expert=8' (no devices needed)")
    p.add_argument("--seq-len", type=int, help="training / cache sequence length for the memory plan (4096)")
    p.add_argument("--batch", type=int, help="global batch for the memory plan (1)")
    p.add_argument("--remat", nargs="+", default=["none", "dots", "full"], choices=["none", "dots", "full"],
                   help="remat policies to plan activations for")
    p.add_argument("--attention", default="flash", choices=["flash", "xla"],
                   help="attention core to plan for: flash kernels (GPU/TPU) or XLA (CPU, attention_impl=xla)")
    p.add_argument("--quantize", choices=("int8",), help="report int8 weight bytes (and what cache fits)")
    p.add_argument("--device-gb", type=float, help="accelerator memory for the fit estimate (default 24)")
    p.set_defaults(func=run)
