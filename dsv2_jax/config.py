"""Model configuration: every DeepSeek-V2 field, both HF config.json dialects, validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from dsv2_jax.ops.attention_backend import IMPLS as ATTENTION_IMPLS

# Presets: configs/ of a source checkout, or the copy a wheel installs as dsv2_jax/configs/.
CONFIGS_DIR = next((d for d in (Path(__file__).resolve().parent.parent / "configs",
                                Path(__file__).resolve().parent / "configs") if d.is_dir()),
                   Path(__file__).resolve().parent / "configs")
TOPK_METHODS = ("greedy", "group_limited_greedy")
MOE_IMPLS = ("reference", "ragged")
GROUPED_GEMM_IMPLS = ("auto", "cpu", "blocked", "gather", "tokamax", "ragged_dot")  # see grouped_gemm.py


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """A run of identical decoder layers stored as one stacked module: HF layers first .. first + count - 1."""
    name: str   # the model attribute and parameter-tree key: "dense_layers" | "moe_layers"
    moe: bool
    first: int
    count: int

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)


class ConfigError(ValueError):
    """A config file or field is invalid; the message names it."""


# Fields a config file must state: they fix the parameter shapes (HF and our JSON alike; an HF config.json from
# transformers lists them all, with null where a feature is off, e.g. q_lora_rank for V2-Lite).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                "first_k_dense_replace")
# A ModelConfig JSON must also state routing and positions (their defaults are DeepSeek-V2's, and silently
# giving a small model V2's YaRN factor 40 or routing scale 16 is wrong); the rest have neutral defaults.
MODEL_JSON_REQUIRED = (*SHAPE_FIELDS, "topk_method", "n_group", "topk_group", "norm_topk_prob",
                       "routed_scaling_factor", "max_position_embeddings", "rope_theta", "rope_type")
YARN_REQUIRED = ("rope_factor", "original_max_position_embeddings", "mscale", "mscale_all_dim")


def require_fields(d: dict[str, Any], fields, source: str) -> None:
    missing = [f for f in fields if f not in d]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Sizes.
    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 60
    num_attention_heads: int = 128
    # MLA.
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE.
    n_routed_experts: int = 160
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "group_limited_greedy"
    n_group: int = 8
    topk_group: int = 3
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 16.0
    scoring_func: str = "softmax"
    # Balance-loss coefficients (paper: expert, device, communication).
    aux_loss_alpha: float = 0.003
    device_aux_loss_alpha: float = 0.05
    comm_aux_loss_alpha: float = 0.02
    seq_aux: bool = True
    # Positions.
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_type: str = "yarn"  # "default" or "yarn"
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.707
    mscale_all_dim: float = 0.707
    # Misc.
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    # Implementation choices (not part of the architecture).
    moe_impl: str = "ragged"
    grouped_gemm: str = "auto"  # backend of the ragged path's grouped GEMM
    attention_impl: str = "auto"

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    def layer_groups(self) -> tuple[LayerGroup, ...]:
        """The non-empty stacked layer groups in depth order: first_k_dense_replace dense layers, then MoE.
        Model, caches and checkpoint name mapping all take their grouping from here."""
        groups = (LayerGroup("dense_layers", False, 0, self.num_dense_layers),
                  LayerGroup("moe_layers", True, self.num_dense_layers, self.num_moe_layers))
        return tuple(g for g in groups if g.count)

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def yarn_enabled(self) -> bool:
        return self.rope_type == "yarn" and self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(mscale_all_dim)^2 under YaRN (the reference's convention)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def latent_cache_dim(self) -> int:
        """Elements cached per token per layer: c_KV plus the shared post-RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(field, msg):
            raise ConfigError(f"config field '{field}': {msg}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f, f"must be a positive integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", f"must be null or a positive integer, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.scoring_func != "softmax":
            fail("scoring_func", f"DeepSeek-V2 gates with 'softmax', got {self.scoring_func!r}")
        if self.moe_layer_freq != 1:
            fail("moe_layer_freq", f"only 1 is supported (every layer after first_k_dense_replace), got {self.moe_layer_freq}")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "DeepSeek-V2 uses an untied lm_head")
        if self.attention_bias:
            fail("attention_bias", "DeepSeek-V2 has no attention bias")
        if self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", f"must be >= 0, got {self.first_k_dense_replace}")
        if self.num_moe_layers > 0:
            for f in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
                v = getattr(self, f)
                if not isinstance(v, int) or v <= 0:
                    fail(f, f"must be a positive integer for MoE layers, got {v!r}")
            if self.n_shared_experts < 0:
                fail("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
            if self.topk_method not in TOPK_METHODS:
                fail("topk_method", f"must be one of {TOPK_METHODS}, got {self.topk_method!r}")
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok", f"{self.num_experts_per_tok} exceeds n_routed_experts {self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                fail("n_group", f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                fail("topk_group", f"{self.topk_group} exceeds n_group {self.n_group}")
            if self.topk_method == "group_limited_greedy":
                per_group = self.n_routed_experts // self.n_group
                if self.topk_group * per_group < self.num_experts_per_tok:
                    fail("topk_group", f"{self.topk_group} groups of {per_group} experts cannot hold "
                         f"num_experts_per_tok={self.num_experts_per_tok}")
        if self.rope_type not in ("default", "yarn"):
            fail("rope_type", f"must be 'default' or 'yarn', got {self.rope_type!r}")
        if self.rope_type == "yarn" and self.rope_factor < 1.0:
            fail("rope_factor", f"YaRN factor must be >= 1, got {self.rope_factor}")
        if self.moe_impl not in MOE_IMPLS:
            fail("moe_impl", f"must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.grouped_gemm not in GROUPED_GEMM_IMPLS:
            fail("grouped_gemm", f"must be one of {GROUPED_GEMM_IMPLS}, got {self.grouped_gemm!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """A full config as `to_dict` / `to_json` write it; the fields in MODEL_JSON_REQUIRED must be present."""
        required = MODEL_JSON_REQUIRED + (YARN_REQUIRED if d.get("rope_type") == "yarn" else ())
        return dataclass_from_dict(cls, d, source, "config", required)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """`deepseek-v2`, `deepseek-v2-lite` or `tiny` (files under configs/)."""
        path = CONFIGS_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json") if not p.stem.startswith("train-"))
            raise ConfigError(f"unknown preset {name!r}; known: {known}")
        return cls.from_json(path)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides) -> ModelConfig:
        """Reads an HF `config.json` (a directory, the file itself, or its parsed dict).

        Accepts the original DeepSeek dialect (`rope_theta` + `rope_scaling{type|rope_type}`, including the
        `"gready"` typo) and the transformers >= 5 dialect (`rope_parameters`).
        """
        if isinstance(path_or_dict, dict):
            d, source = dict(path_or_dict), "config dict"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ConfigError(f"{p}: config.json not found")
            d, source = read_json_object(p), str(p)
        return cls(**_hf_fields(d, source), **overrides)


def dataclass_from_dict(cls, d: dict[str, Any], source: str, what: str, required=()):
    """cls(**d), refusing unknown keys and missing `required` ones with one line naming them (typos must not
    be silently ignored, nor gaps silently filled with defaults)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{source}: unknown {what} field(s) {unknown}")
    require_fields(d, required, source)
    return cls(**d)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def read_json_object(path) -> dict[str, Any]:
    """A JSON object from `path`; ConfigError naming the file if it is missing, invalid or not an object."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


_HF_COPY = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq",
    "norm_topk_prob", "routed_scaling_factor", "scoring_func", "max_position_embeddings", "rms_norm_eps",
    "hidden_act", "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id",
)


def _hf_fields(d: dict[str, Any], source: str) -> dict[str, Any]:
    mt = d.get("model_type")
    if mt is not None and mt not in ("deepseek_v2", "deepseek"):
        raise ConfigError(f"{source}: model_type {mt!r} is not deepseek_v2")
    require_fields(d, SHAPE_FIELDS, source)
    out: dict[str, Any] = {k: d[k] for k in _HF_COPY if d.get(k) is not None or k == "q_lora_rank"}
    for k in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts"):
        if d.get(k) is None and k in out:
            out.pop(k)
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = out["eos_token_id"][0]
    if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads")):
        raise ConfigError(f"{source}: num_key_value_heads must equal num_attention_heads for MLA")
    method = d.get("topk_method") or "greedy"
    out["topk_method"] = "greedy" if method == "gready" else method
    out["n_group"] = d.get("n_group") or 1
    out["topk_group"] = d.get("topk_group") or 1
    if out["topk_method"] == "greedy":
        # HF configs carry only the expert-level coefficient; the paper uses the device-level and
        # communication losses only with device-limited routing (V2), not for V2-Lite.
        out.update(device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    if "aux_loss_alpha" in d:
        out["aux_loss_alpha"] = float(d["aux_loss_alpha"])
    if "seq_aux" in d:
        out["seq_aux"] = bool(d["seq_aux"])

    # RoPE: transformers >= 5 nests everything in rope_parameters; the original dialect uses
    # top-level rope_theta plus rope_scaling{type|rope_type, ...}.
    rope = d.get("rope_parameters")
    if rope is None:
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default or yarn)")
    out["rope_type"] = rope_type
    out["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type == "yarn":
        if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
            raise ConfigError(f"{source}: yarn rope needs 'factor' and 'original_max_position_embeddings'")
        out["rope_factor"] = float(rope["factor"])
        out["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        out["beta_fast"] = float(rope.get("beta_fast") or 32)
        out["beta_slow"] = float(rope.get("beta_slow") or 1)
        out["mscale"] = float(rope.get("mscale") or 1.0)
        out["mscale_all_dim"] = float(rope.get("mscale_all_dim") or 0.0)
    else:
        out.update(rope_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
        out["original_max_position_embeddings"] = int(d.get("max_position_embeddings", 4096))
    return out


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers >= 5 config.json for this architecture (used by export and tests)."""
    d = {k: getattr(cfg, k) for k in _HF_COPY}
    d.update(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", topk_method=cfg.topk_method,
        n_group=cfg.n_group, topk_group=cfg.topk_group, aux_loss_alpha=cfg.aux_loss_alpha, seq_aux=cfg.seq_aux,
        num_key_value_heads=cfg.num_attention_heads,
    )
    if cfg.rope_type == "yarn":
        d["rope_parameters"] = dict(
            rope_type="yarn", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
            original_max_position_embeddings=cfg.original_max_position_embeddings, beta_fast=cfg.beta_fast,
            beta_slow=cfg.beta_slow, mscale=cfg.mscale, mscale_all_dim=cfg.mscale_all_dim)
    else:
        d["rope_parameters"] = dict(rope_type="default", rope_theta=cfg.rope_theta)
    return d
