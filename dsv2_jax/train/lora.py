"""LoRA: low-rank adapters on the projections of a frozen base (`--set lora_rank=16` with `--init-from DIR`).

For a projection W [*in, *out] (stacked over layers, and experts for routed experts) the adapter is
A [L, *in, r], B [L, r, *out]; the layer computes with W + (alpha/r)·A·B. B starts at zero, so step 0 is the
base model exactly. Targets (`lora_targets`): attn (MLA wq / wq_a / wq_b / wkv_a / w_uk / w_uv / wo), mlp (the
dense layers), shared (shared experts), experts (routed, optional), or single parameter names.

Only the adapters are trained, optimised (AdamW moments) and checkpointed: the run's checkpoints hold
{"params": adapters, ...}; `lora.json` names the base. `load_model(RUN_DIR)` gives base + adapters,
`dsv2 export RUN_DIR OUT --merge-lora` writes merged HF weights, streamed layer by layer.

Why not qwix's LoRA provider: qwix adds adapters by intercepting the dot_generals of module calls and creating
their parameters in the calling module. Our layers run inside a `lax.scan` over `nnx.split` state (one merged
module per scan step, model.scan_layers), so adapters created there would not persist, and qwix's adapters sit
on activations of specific einsum/ragged_dot calls rather than on our stacked parameters. Here the adapter is a
parameter value (`lazy_params.LoraWeight`) that the scan materializes per layer: it works for every projection,
for int8 bases (QLoRA: the base is a qwix QArray), under any mesh, and the merged export is the same function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax.config import ConfigError, ModelConfig
from dsv2_jax.model.lazy_params import TARGET_GROUPS, LoraWeight, matches, projection_layout
from dsv2_jax.checkpoint.orbax_io import flatten, unflatten
from dsv2_jax.model.precision import cast_params
from dsv2_jax.train.state import BATCH_KEYS, BoundStep, Trainer

LORA_FILE = "lora.json"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_train_config(cls, tc) -> LoraConfig:
        return cls(tc.lora_rank, float(tc.lora_alpha), tuple(tc.lora_targets))


def adapter_shapes(cfg: ModelConfig, lc: LoraConfig) -> dict[tuple, tuple[tuple, tuple, int]]:
    """{parameter path: (A shape, B shape, input axes)} for every targeted projection."""
    from dsv2_jax.checkpoint.convert import leaf_specs

    out = {}
    for path, leaf in leaf_specs(cfg, jnp.float32).items():
        if matches(path, lc.targets):
            _, n_batch, n_in = projection_layout(path)
            s = leaf.shape
            out[path] = ((*s[:n_batch + n_in], lc.rank), (*s[:n_batch], lc.rank, *s[n_batch + n_in:]), n_in)
    if not out:
        names = [n for n in lc.targets if n not in TARGET_GROUPS]
        raise ConfigError(f"train config field 'lora_targets': {list(lc.targets)} matches no projection "
                          f"(groups: {list(TARGET_GROUPS)}{'; unknown: ' + str(names) if names else ''})")
    return out


def init_adapters(shapes: dict, key: jax.Array) -> dict:
    """A ~ normal(0, 1/fan_in), B = 0 (so the adapted model starts as the base). Nested dict {path: {a, b}}."""
    keys = jax.random.split(key, len(shapes))
    flat = {}
    for k, (path, (a_shape, b_shape, n_in)) in zip(keys, sorted(shapes.items())):
        fan_in = math.prod(a_shape[len(a_shape) - 1 - n_in:-1])
        flat[(*path, "a")] = jax.random.normal(k, a_shape, jnp.float32) / math.sqrt(fan_in)
        flat[(*path, "b")] = jnp.zeros(b_shape, jnp.float32)
    return unflatten(flat)


def with_adapters(state: nnx.State, adapters: dict, scale: float) -> nnx.State:
    """The state with each adapted projection's value a LoraWeight(base, A, B) (materialized per layer)."""
    flat = flatten(adapters)
    out = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        if (*path, "a") in flat:
            n_in = projection_layout(path)[2]
            var = var.replace(LoraWeight(var.get_value(), flat[(*path, "a")], flat[(*path, "b")], scale, n_in))
        out.append((path, var))
    return nnx.from_flat_state(out)


class LoraTrainer(Trainer):
    """Trainer whose state holds only the adapters; the frozen base (compute dtype, or int8 with
    `quantize`) is loaded from init_from, placed by the mesh rules and passed to every step un-donated."""

    def __init__(self, tc, mesh, cfg: ModelConfig | None = None):
        from dsv2_jax.train.init_from import load_params

        cfg = cfg or tc.model_config()
        self.lora = LoraConfig.from_train_config(tc)
        self.shapes = adapter_shapes(cfg, self.lora)
        super().__init__(tc, mesh, cfg)
        base = load_params(tc.init_from, mesh, tc.compute_dtype)
        if tc.quantize:
            from dsv2_jax.infer.quantize import quantize_state

            base = quantize_state(base, tc.quantize, self.compute_dtype)
        self.base = base
        frozen_sh = jax.tree.map(lambda x: x.sharding, base)
        batch_sh = {k: self.batch_sharding for k in BATCH_KEYS}
        step = jax.jit(self._train_step, donate_argnums=0,
                       in_shardings=(self.state_shardings, batch_sh, self.weights_sharding, frozen_sh),
                       out_shardings=(self.state_shardings, None))
        evaluate = jax.jit(self._eval_step, in_shardings=(self.state_shardings["params"], batch_sh, frozen_sh))
        self.step = BoundStep(step, self.balance_weights, self.base)
        self.eval_step = lambda params, batch: evaluate(params, batch, self.base)

    def _init(self, seed: int):
        with jax.threefry_partitionable(jax.default_backend() != "cpu"):  # as Trainer._init: CPU compiles faster
            adapters = init_adapters(self.shapes, jax.random.key(seed))
        return {"params": adapters, "opt_state": self.tx.init(adapters), "step": jnp.zeros((), jnp.int32)}

    def model_for(self, params, frozen=None):
        dt = self.compute_dtype
        return nnx.merge(self.graphdef, with_adapters(cast_params(frozen, dt), cast_params(params, dt),
                                                      self.lora.scale))


# ---- runs on disk: lora.json, adapters, base + adapters, merged export -----------------------------------------

def write_lora_json(workdir: Path, tc) -> None:
    d = {"base": str(Path(tc.init_from).absolute()), "rank": tc.lora_rank, "alpha": float(tc.lora_alpha),
         "targets": list(tc.lora_targets)}
    tmp = Path(workdir) / (LORA_FILE + ".tmp")
    tmp.write_text(json.dumps(d, indent=2))
    tmp.replace(Path(workdir) / LORA_FILE)


def is_lora_run(path) -> bool:
    return (Path(path) / LORA_FILE).is_file()


def read_lora_run(run_dir) -> tuple[Path, LoraConfig]:
    d = json.loads((Path(run_dir) / LORA_FILE).read_text())
    return Path(d["base"]), LoraConfig(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


def load_adapters(run_dir, cfg: ModelConfig, lc: LoraConfig, sharding=None) -> dict:
    """The newest checkpoint's adapters (fp32), as the nested dict the trainer holds."""
    import orbax.checkpoint as ocp

    from dsv2_jax.checkpoint.train_checkpoints import latest_state_dir

    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = unflatten({(*p, ab): jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
                        for p, (a, b, _) in adapter_shapes(cfg, lc).items() for ab, s in (("a", a), ("b", b))})
    item = {"params": target}
    restored = ocp.PyTreeCheckpointer().restore(
        latest_state_dir(run_dir), args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    return restored["params"]


def merged_state(state: nnx.State, adapters: dict, scale: float) -> nnx.State:
    """base + adapters as plain arrays in the base's dtype (int8 bases stay LoraWeights: QLoRA inference)."""
    from dsv2_jax.model.lazy_params import materialize_leaf
    import qwix

    def merge(x):
        return x if isinstance(x, LoraWeight) and isinstance(x.base, qwix.QArray) else materialize_leaf(x)

    return jax.tree.map(merge, with_adapters(state, adapters, scale), is_leaf=lambda x: isinstance(x, LoraWeight))


def load_lora_model(run_dir, dtype="float32", *, mesh=None, quantize=None, **config_overrides):
    """The base named by RUN_DIR/lora.json with the run's newest adapters merged in (kept separate on an int8
    base, QLoRA). `quantize` as in `load_model`."""
    from dsv2_jax import load_model

    base_dir, lc = read_lora_run(run_dir)
    model = load_model(base_dir, dtype, mesh=mesh, quantize=quantize, **config_overrides)
    adapters = load_adapters(run_dir, model.config, lc)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, merged_state(state, adapters, lc.scale))


class _MergedReader:
    """`reader.read(path, layer)` of the base (HF or Orbax, streamed) plus the adapters' delta, in numpy."""

    def __init__(self, base_dir: Path, cfg: ModelConfig, adapters: dict, scale: float):
        from dsv2_jax.checkpoint.convert import _open_converted, is_orbax_dir, leaf_specs

        self.cfg, self.scale = cfg, scale
        self.adapters = {p: np.asarray(v) for p, v in flatten(adapters).items()}
        self.paths = list(leaf_specs(cfg, np.float32))
        if is_orbax_dir(base_dir):
            self._base = _open_converted(base_dir)[1].read
        else:
            from dsv2_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

            self._ckpt = SafetensorsCheckpoint(base_dir)
            self._base = self._read_hf

    def _read_hf(self, path, index):
        from dsv2_jax.checkpoint.hf_checkpoint import entry_from_hf, is_moe_layer, layer_entries, stacked_groups, top_entries

        if index is None:
            ent = next(e for e in top_entries(self.cfg) if e.path == path)
            return ent.to_ours(self._ckpt.get(ent.hf))
        layers = dict(stacked_groups(self.cfg))[path[0]]
        ent = next(e for e in layer_entries(self.cfg, is_moe_layer(self.cfg, layers[0])) if e.path == path[1:])
        return entry_from_hf(self._ckpt.get, self.cfg, layers[index], ent, np.float32)

    def read(self, path, index=None):
        w = np.asarray(self._base(path, index), np.float32)
        if (*path, "a") in self.adapters:
            a, b = (self.adapters[(*path, k)] if index is None else self.adapters[(*path, k)][index] for k in "ab")
            n_in = projection_layout(path)[2]
            w = w + np.asarray(LoraWeight(w, a, b, self.scale, n_in).delta())
        return w


def export_merged(run_dir, hf_dir, dtype=None, force: bool = False, progress: bool = True, **kw) -> dict:
    """A LoRA run → HF safetensors of base + adapters, one layer at a time (dtype default: float32)."""
    from dsv2_jax.checkpoint.convert import write_hf_dir
    from dsv2_jax.checkpoint.hf_checkpoint import resolve_dtype
    from dsv2_jax.train.init_from import checkpoint_config

    base_dir, lc = read_lora_run(run_dir)
    cfg = checkpoint_config(base_dir)
    adapters = load_adapters(run_dir, cfg, lc, jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
    if Path(hf_dir).absolute() == Path(run_dir).absolute():
        raise ValueError(f"{hf_dir}: output directory is the run directory")
    return write_hf_dir(cfg, _MergedReader(base_dir, cfg, adapters, lc.scale), hf_dir,
                        resolve_dtype(dtype or "float32"), base_dir, force, progress=progress, **kw)
