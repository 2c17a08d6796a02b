"""Weight-only int8 inference: `load_model(path, quantize="int8")`, `dsv2 generate --quantize int8`.

Every projection (MLA, dense and shared-expert MLPs, routed experts; see lazy_params.projection_layout) is
stored as a qwix QArray: int8 values with one scale per output channel (absmax over the input axes; layers and
experts each get their own scales). The embedding, norms, router and lm_head stay in the model dtype. Each layer's
weights are dequantized to the compute dtype inside the layer scan (model.scan_layers), so memory holds int8
weights plus one layer in bfloat16; the matmuls run in bfloat16.

Loading quantizes on the host (the CPU backend) and then moves the int8 tree to the accelerator or the mesh, so
the accelerator never holds the bfloat16 model: V2-Lite needs ~16 GB of accelerator memory (see `memory_report`
and `dsv2 info --quantize int8`), host memory the bfloat16 model once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.lazy_params import TARGET_GROUPS, matches, projection_layout
from dsv2_jax.model.precision import param_dtype

QUANTIZE_MODES = ("int8",)


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")


def channel_axes(path: tuple, ndim: int) -> tuple[int, ...]:
    """Axes that keep their own scale: all but the projection's input axes."""
    _, n_batch, n_in = projection_layout(path)
    return tuple(i for i in range(ndim) if not n_batch <= i < n_batch + n_in)


@functools.partial(jax.jit, static_argnames=("axes", "scale_dtype"))
def quantize_int8(w: jax.Array, axes: tuple[int, ...], scale_dtype) -> qwix.QArray:
    """Symmetric absmax int8 with per-channel scales over `axes` (qwix)."""
    return qwix.quantize(w, jnp.int8, channelwise_axes=axes, scale_dtype=scale_dtype)


def quantize_state(state: nnx.State, mode: str = "int8", scale_dtype=None, targets=TARGET_GROUPS) -> nnx.State:
    """The state with every targeted projection replaced by a QArray (scales in `scale_dtype`, default the
    weight's dtype: the dtype the layer dequantizes to). Quantized where each weight lies."""
    check_mode(mode)
    out = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        if matches(path, targets):
            w = var.get_value()
            dt = jnp.dtype(scale_dtype or w.dtype)
            var = var.replace(quantize_int8(w, channel_axes(path, w.ndim), dt))
        out.append((path, var))
    return nnx.from_flat_state(out)


def place(state: nnx.State, mesh=None) -> nnx.State:
    """Moves a (partly quantized) state to the default device, or to the mesh by the logical-axis rules (a
    QArray's values and scales follow its weight's axes; size-1 scale axes are replicated)."""
    from dsv2_jax.parallel.sharding import logical_to_spec

    if mesh is None:
        return jax.device_put(state, jax.devices()[0])
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes")
        spec = (lambda shape: logical_to_spec(axes, shape, mesh)) if axes else (lambda shape: jax.sharding.PartitionSpec())
        value = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x.shape))),
                             var.get_value())
        out.append((tuple(path), var.replace(value)))
    return nnx.from_flat_state(out)


def load_quantized(path, dtype="bfloat16", mode: str = "int8", *, mesh=None, **config_overrides):
    """A checkpoint (any kind load_model reads) loaded on the host, quantized there, then placed."""
    from dsv2_jax.checkpoint.load import load_checkpoint
    from dsv2_jax.checkpoint.hf_checkpoint import resolve_dtype
    from dsv2_jax.parallel.expert_parallel import use_mesh
    from dsv2_jax.train.lora import is_lora_run, load_lora_model

    check_mode(mode)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        if is_lora_run(path):  # int8 base, adapters kept beside it (QLoRA inference)
            return load_lora_model(path, dtype, mesh=mesh, quantize=mode, **config_overrides)
        model = load_checkpoint(path, dtype, shardings=_everywhere(path, cpu, dtype, config_overrides),
                                **config_overrides)
        graphdef, state = nnx.split(model)
        state = quantize_state(state, mode, resolve_dtype(dtype))
    return use_mesh(nnx.merge(graphdef, place(state, mesh)), mesh)  # experts expert-parallel, as unquantized


def _everywhere(path, device, dtype, overrides) -> dict:
    """A pure dict of one-device shardings shaped like the checkpoint's parameter tree."""
    from dsv2_jax.train.init_from import checkpoint_config
    from dsv2_jax.model.transformer import abstract_model

    cfg = checkpoint_config(path).replace(**overrides)
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda _: sharding, nnx.to_pure_dict(nnx.state(abstract_model(cfg, jnp.float32))))


def memory_report(cfg: ModelConfig, quantize: str | None = None, dtype="bfloat16", cache_dtype="bfloat16",
                  device_bytes: float = 24e9, reserve_fraction: float = 0.1) -> dict:
    """Weight bytes (int8 values + scales, or plain `dtype`), latent-cache bytes per token, and how many cached
    tokens fit in `device_bytes` after the weights, one layer's dequantized weights and a `reserve_fraction`
    of the device for activations and the runtime."""
    from dsv2_jax.checkpoint.convert import leaf_specs

    item = np.dtype(jnp.dtype(dtype)).itemsize
    weights, layer = 0, {}  # layer: bytes of one layer's dequantized projections, per layer group
    for path, leaf in leaf_specs(cfg, jnp.float32).items():
        n = int(np.prod(leaf.shape))
        if quantize and matches(path, TARGET_GROUPS):
            axes = channel_axes(path, len(leaf.shape))
            scales = int(np.prod([leaf.shape[i] for i in axes]))
            weights += n + scales * item
            layer[path[0]] = layer.get(path[0], 0) + n // leaf.shape[0] * item
        else:
            weights += n * param_dtype(path, jnp.dtype(dtype)).itemsize
    layer_peak = max(layer.values(), default=0)
    cache_per_token = cfg.latent_cache_dim * cfg.num_hidden_layers * np.dtype(jnp.dtype(cache_dtype)).itemsize
    free = device_bytes * (1 - reserve_fraction) - weights - layer_peak
    return {"quantize": quantize or "none", "weight_bytes": int(weights), "weight_gb": round(weights / 1e9, 2),
            "dequant_layer_bytes": int(layer_peak), "cache_bytes_per_token": int(cache_per_token),
            "device_gb": device_bytes / 1e9, "cache_tokens_that_fit": max(int(free // cache_per_token), 0)}


# ---- quality checks against the unquantized model (tests/test_quantize.py, tools/eval_quantize.py) ---------------

def greedy_agreement(ref, model, prompt: list[int], new_tokens: int = 256) -> dict:
    """Greedy continuations of `prompt` by both models: `teacher_forced` is the fraction of the reference's
    tokens that `model` also ranks first when fed the reference's own prefix; `free_running` the fraction of
    positions where the two free-running continuations agree; `identical_prefix` their common prefix length."""
    from dsv2_jax.infer.engine import generate

    want = generate(ref, [prompt], new_tokens)[0]
    got = generate(model, [prompt], new_tokens)[0]
    seq = jnp.asarray([prompt + want], jnp.int32)
    pos = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
    logits = model(seq, pos, jnp.ones_like(seq))  # eager calls compile once (model/eager.py)
    ranked = np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1))
    same = np.asarray(want) == np.asarray(got)
    return {"teacher_forced": float(np.mean(ranked == np.asarray(want))), "free_running": float(same.mean()),
            "identical_prefix": int(np.argmin(same)) if not same.all() else len(want), "tokens": len(want)}


def perplexity(model, batches) -> float:
    """exp(mean next-token NLL) over the loss_mask tokens of dsv2_jax.train.data batches."""
    from dsv2_jax.train.losses import cross_entropy

    nll = count = 0.0
    for b in batches:
        logits = model(*(jnp.asarray(b[k]) for k in ("inputs", "positions", "segment_ids")))
        n = float(b["loss_mask"].sum())
        nll += float(cross_entropy(logits, jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"]))) * n
        count += n
    return float(np.exp(nll / max(count, 1.0)))
