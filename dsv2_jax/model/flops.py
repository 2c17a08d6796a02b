"""Model FLOPs per token (matmuls only, 2 FLOPs per multiply-add) for MFU: MLA + dense MLP + DeepSeekMoE + lm_head.

Attention scores and the value mix are counted for a causal row of length seq_len (on average seq_len / 2 keys
per query). Projections count the expanded (training) form of MLA: K/V decompressed for every token.
Training = 3 × forward (backward costs twice the forward).
"""

from __future__ import annotations

from dsv2_jax.config import ModelConfig

# Dense bf16 peak per chip, by device_kind substring (lower-case). Unknown devices (e.g. CPU) give no MFU.
PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "v6": 918e12, "v5p": 459e12, "v5 lite": 197e12,
              "v5e": 197e12, "v4": 275e12}


def attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Per token per layer: MLA projections and the attention itself."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    dqk, c, r, nope, v = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = 2 * d * h * dqk
    else:
        q = 2 * d * cfg.q_lora_rank + 2 * cfg.q_lora_rank * h * dqk
    kv = 2 * d * (c + r) + 2 * c * h * (nope + v)
    out = 2 * h * v * d
    context = seq_len / 2  # causal
    core = 2 * h * dqk * context + 2 * h * v * context
    return q + kv + out + core


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d = cfg.hidden_size
    dense_mlp = 3 * 2 * d * cfg.intermediate_size
    moe = (2 * d * cfg.n_routed_experts                                          # router
           + cfg.num_experts_per_tok * 3 * 2 * d * cfg.moe_intermediate_size     # routed experts
           + 3 * 2 * d * cfg.shared_intermediate_size)                            # shared experts
    return (cfg.num_hidden_layers * attention_flops(cfg, seq_len) + cfg.num_dense_layers * dense_mlp
            + cfg.num_moe_layers * moe + 2 * d * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "").lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
