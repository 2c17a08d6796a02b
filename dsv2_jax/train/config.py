"""TrainConfig: everything a training run needs besides the model architecture, loadable from JSON.

`--set key=value` overrides any field; `--set model.FIELD=value` overrides a ModelConfig field of the model
(values parse as JSON where possible: 3e-4, true, null, [0.6, 0.9]; otherwise they stay strings).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from dsv2_jax.config import ConfigError, ModelConfig, dataclass_from_dict, read_json_object

REMAT_CHOICES = ("none", "full", "dots")
COMPUTE_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str | None = None            # preset, ModelConfig / HF config JSON; None = init_from's config, or tiny
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: tuple = ()                    # files / directories; empty = the embedded default corpus (stdlib .py)
    eval_data: tuple = ()               # held-out files / directories for the eval loss
    eval_every: int = 0                 # steps between evals (0 = off; needs eval_data)
    eval_batches: int = 8               # global batches per eval (a fixed prefix of eval_data, in order)
    tokenizer: str | None = None        # tokenizer.json or HF dir; None = byte tokenizer
    seq_len: int = 256
    global_batch: int = 8
    steps: int = 1000
    # Optimiser and schedule (paper: AdamW 0.9/0.95, wd 0.1, clip 1.0, warmup then ×0.316 at 60% and 90%).
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_at: tuple = (0.6, 0.9)
    decay_factor: float = 0.316
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Parallelism and numerics.
    mesh: str = ""                      # e.g. "data=2,expert=4"; empty = one device
    distributed: bool = False           # jax.distributed.initialize() (multi-host)
    compute_dtype: str = "bfloat16"     # params stay fp32 (master); cast inside the step
    remat: str = "none"
    unroll_layers: bool | None = None   # layer scans unrolled; None = on CPU without remat (state.py)
    moe_dispatch: str = "dropless"      # expert-parallel mode: dropless | capacity
    capacity_factor: float = 1.0
    never_drop_every: int = 10          # capacity mode: 1 in N sequences is never dropped (paper ~10%); 0 = off
    seed: int = 0
    # Fine-tuning (docs/finetuning.md).
    init_from: str | None = None        # HF dir, `dsv2 convert` output or train workdir: start from its weights
    data_format: str = "auto"           # text | sft | auto (JSONL whose records hold messages / prompt → sft)
    skip_bad_records: bool = False      # sft: skip and count malformed records instead of failing
    lora_rank: int = 0                  # > 0: train only low-rank adapters on lora_targets (needs init_from)
    lora_alpha: float = 16.0
    lora_targets: tuple = ("attn", "mlp", "shared")  # attn, mlp (dense layers), shared, experts, or param names
    quantize: str | None = None         # LoRA: "int8" keeps the frozen base in int8 (QLoRA)
    # Bookkeeping.
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1

    def __post_init__(self):
        def fail(field, msg):
            raise ConfigError(f"train config field '{field}': {msg}")

        for f in ("seq_len", "global_batch", "steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f, f"must be a positive integer, got {v!r}")
        for f in ("eval_every", "eval_batches"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                fail(f, f"must be a non-negative integer, got {getattr(self, f)!r}")
        if self.eval_every and not self.eval_data:
            fail("eval_every", "needs eval_data (held-out files or directories)")
        if not isinstance(self.never_drop_every, int) or self.never_drop_every < 0:
            fail("never_drop_every", f"must be a non-negative integer, got {self.never_drop_every!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            fail("warmup_steps", f"must be a non-negative integer, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            fail("lr", f"must be a finite positive number, got {self.lr!r}")
        for f in ("decay_factor", "b1", "b2", "weight_decay", "clip_norm", "capacity_factor"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                fail(f, f"must be a finite non-negative number, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            fail("seed", f"must be an integer in [0, 2**32), got {self.seed!r}")
        if self.remat not in REMAT_CHOICES:
            fail("remat", f"must be one of {REMAT_CHOICES}, got {self.remat!r}")
        if not (self.unroll_layers is None or isinstance(self.unroll_layers, bool)):
            fail("unroll_layers", f"must be true, false or null, got {self.unroll_layers!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            fail("compute_dtype", f"must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.moe_dispatch not in ("dropless", "capacity"):
            fail("moe_dispatch", f"must be 'dropless' or 'capacity', got {self.moe_dispatch!r}")
        if not all(0 < p <= 1 for p in self.decay_at):
            fail("decay_at", f"fractions of the run in (0, 1], got {self.decay_at!r}")
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "eval_data", tuple(self.eval_data))
        object.__setattr__(self, "decay_at", tuple(self.decay_at))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.data_format not in ("auto", "text", "sft"):
            fail("data_format", f"must be auto, text or sft, got {self.data_format!r}")
        if self.data_format == "sft" and not self.data:
            fail("data_format", "sft needs data (JSONL files of messages or prompt/completion records)")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            fail("lora_rank", f"must be a non-negative integer, got {self.lora_rank!r}")
        if self.quantize not in (None, "int8") or (self.quantize and not self.lora_rank):
            fail("quantize", f"'int8' (with lora_rank > 0: QLoRA) or null, got {self.quantize!r}")
        if self.lora_rank and not self.init_from:
            fail("lora_rank", "LoRA adapts released weights: set init_from (--init-from DIR)")

    def model_config(self) -> ModelConfig:
        from dsv2_jax.train.init_from import checkpoint_config, resolve_model_config

        base = (resolve_model_config(self.model) if self.model else
                checkpoint_config(self.init_from) if self.init_from else ModelConfig.preset("tiny"))
        try:
            return base.replace(**self.model_overrides)
        except TypeError as e:
            raise ConfigError(f"model_overrides: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train config") -> TrainConfig:
        return dataclass_from_dict(cls, d, source, "train config")

    @classmethod
    def load(cls, spec: str) -> TrainConfig:
        """A TrainConfig JSON file, or a model preset / ModelConfig JSON (train with defaults)."""
        p = Path(spec)
        if p.suffix == ".json":
            d = read_json_object(p)
            if "vocab_size" in d:  # a model config (ours or HF's), not a train config
                return cls(model=str(p))
            return cls.from_dict(d, source=str(p))
        ModelConfig.preset(spec)  # fail early on unknown names
        return cls(model=spec)

    def with_overrides(self, items: list[str]) -> TrainConfig:
        """Applies `key=value` strings (see module docstring)."""
        d = self.to_dict()
        model = dict(d["model_overrides"])
        fields = {f.name for f in dataclasses.fields(self)}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("model."):
                model[key[len("model."):]] = value
            elif key in fields:
                d[key] = value
            else:
                raise ConfigError(f"--set {item!r}: unknown train config field {key!r}")
        d["model_overrides"] = model
        return TrainConfig.from_dict(d)
