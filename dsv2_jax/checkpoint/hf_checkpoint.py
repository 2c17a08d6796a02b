"""HF DeepSeek-V2 checkpoint names ⇄ this model's parameter tree.

HF stores Linear weights as [out, in]; we keep math layout ([in, out], heads explicit, experts stacked
[E, D, F], layers stacked). The mapping is one table per layer kind, used in both directions, so loading,
conversion and export can never disagree. Conversion streams one layer at a time through the same functions.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.precision import param_dtype
from dsv2_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports include


class Entry(NamedTuple):
    hf: str            # name under model.layers.N. (may contain {e} for one routed expert)
    path: tuple        # path inside the DecoderLayer (or model) parameter tree
    to_ours: Callable  # HF array -> our array
    to_hf: Callable    # our array -> HF array
    hf_shape: tuple


def _t(w):  # [out, in] <-> [in, out]
    return w.T


def _linear(hf, path, n_in, n_out) -> Entry:
    return Entry(hf, path, _t, _t, (n_out, n_in))


def _heads_out(hf, path, n_in, h, d) -> Entry:
    """Linear whose output splits into heads: HF [h*d, in] <-> ours [in, h, d]."""
    return Entry(hf, path, lambda w: w.T.reshape(n_in, h, d), lambda p: p.reshape(n_in, h * d).T, (h * d, n_in))


def _norm(hf, path, n) -> Entry:
    return Entry(hf, path, lambda w: w, lambda p: p, (n,))


def layer_entries(cfg: ModelConfig, moe: bool) -> list[Entry]:
    d, h, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    out = [_norm("input_layernorm.weight", ("attn_norm", "scale"), d),
           _norm("post_attention_layernorm.weight", ("mlp_norm", "scale"), d)]
    a = "self_attn."
    if cfg.q_lora_rank is None:
        out.append(_heads_out(a + "q_proj.weight", ("attn", "wq"), d, h, cfg.qk_head_dim))
    else:
        q = cfg.q_lora_rank
        out += [_linear(a + "q_a_proj.weight", ("attn", "wq_a"), d, q),
                _norm(a + "q_a_layernorm.weight", ("attn", "q_norm", "scale"), q),
                _heads_out(a + "q_b_proj.weight", ("attn", "wq_b"), q, h, cfg.qk_head_dim)]
    out += [_linear(a + "kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), d, cfg.latent_cache_dim),
            _norm(a + "kv_a_layernorm.weight", ("attn", "kv_norm", "scale"), c),
            # kv_b_proj rows are per head [k_nope | v]; we split it into W_UK [c,h,nope] and W_UV [c,h,v].
            Entry(a + "kv_b_proj.weight", ("attn", "w_uk"),
                  lambda w: w.reshape(h, nope + v, c)[:, :nope].transpose(2, 0, 1), None, (h * (nope + v), c)),
            Entry(a + "kv_b_proj.weight", ("attn", "w_uv"),
                  lambda w: w.reshape(h, nope + v, c)[:, nope:].transpose(2, 0, 1), None, (h * (nope + v), c)),
            Entry(a + "o_proj.weight", ("attn", "wo"), lambda w: w.T.reshape(h, v, d),
                  lambda p: p.reshape(h * v, d).T, (d, h * v))]
    if not moe:
        f = cfg.intermediate_size
        return out + [_linear("mlp.gate_proj.weight", ("mlp", "w_gate"), d, f),
                      _linear("mlp.up_proj.weight", ("mlp", "w_up"), d, f),
                      _linear("mlp.down_proj.weight", ("mlp", "w_down"), f, d)]
    f, e = cfg.moe_intermediate_size, cfg.n_routed_experts
    out += [_linear("mlp.gate.weight", ("mlp", "w_router"), d, e),
            _linear("mlp.experts.{e}.gate_proj.weight", ("mlp", "w_gate"), d, f),
            _linear("mlp.experts.{e}.up_proj.weight", ("mlp", "w_up"), d, f),
            _linear("mlp.experts.{e}.down_proj.weight", ("mlp", "w_down"), f, d)]
    if cfg.n_shared_experts:
        s = cfg.shared_intermediate_size
        out += [_linear("mlp.shared_experts.gate_proj.weight", ("mlp", "shared", "w_gate"), d, s),
                _linear("mlp.shared_experts.up_proj.weight", ("mlp", "shared", "w_up"), d, s),
                _linear("mlp.shared_experts.down_proj.weight", ("mlp", "shared", "w_down"), s, d)]
    return out


def top_entries(cfg: ModelConfig) -> list[Entry]:
    d, vocab = cfg.hidden_size, cfg.vocab_size
    return [Entry("model.embed_tokens.weight", ("embed",), lambda w: w, lambda p: p, (vocab, d)),
            _norm("model.norm.weight", ("norm", "scale"), d),
            _linear("lm_head.weight", ("lm_head",), d, vocab)]


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    return i >= cfg.num_dense_layers


def hf_layer_names(cfg: ModelConfig, i: int) -> dict[str, tuple]:
    """Every HF tensor name of layer i with its expected shape."""
    names = {}
    for ent in layer_entries(cfg, is_moe_layer(cfg, i)):
        for e in range(cfg.n_routed_experts) if "{e}" in ent.hf else (None,):
            names[f"model.layers.{i}." + ent.hf.format(e=e)] = ent.hf_shape
    return names


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    shapes = {ent.hf: ent.hf_shape for ent in top_entries(cfg)}
    for i in range(cfg.num_hidden_layers):
        shapes.update(hf_layer_names(cfg, i))
    return shapes


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.astype(dtype)


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def entry_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, i: int, ent: Entry, dtype) -> np.ndarray:
    """One parameter of layer i from HF tensors; routed experts are filled into one preallocated [E, ...] block
    (no list-then-stack copy), so streaming conversion peaks at one expert block."""
    dt, prefix = param_dtype(ent.path, dtype), f"model.layers.{i}."
    if "{e}" not in ent.hf:
        return np.ascontiguousarray(_cast(ent.to_ours(get(prefix + ent.hf)), dt))
    out = None
    for e in range(cfg.n_routed_experts):
        one = ent.to_ours(get(prefix + ent.hf.format(e=e)))
        if out is None:
            out = np.empty((cfg.n_routed_experts, *one.shape), dt)
        out[e] = one
    return out


def layer_to_hf(tree: dict, cfg: ModelConfig, i: int, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """One layer's parameter tree → (HF name, [out, in] array in `dtype`) pairs (inverse of entry_from_hf)."""
    prefix = f"model.layers.{i}."
    for ent in layer_entries(cfg, is_moe_layer(cfg, i)):
        if ent.path == ("attn", "w_uk"):
            uk, uv = _get(tree, ("attn", "w_uk")), _get(tree, ("attn", "w_uv"))
            kv = np.concatenate([uk, uv], axis=-1).transpose(1, 2, 0)  # [h, nope+v, c]
            yield prefix + ent.hf, _cast(np.ascontiguousarray(kv.reshape(-1, kv.shape[-1])), dtype)
        elif ent.to_hf is None:
            continue
        elif "{e}" in ent.hf:
            stacked = _get(tree, ent.path)
            for e in range(cfg.n_routed_experts):
                yield prefix + ent.hf.format(e=e), _cast(np.ascontiguousarray(ent.to_hf(stacked[e])), dtype)
        else:
            yield prefix + ent.hf, _cast(np.ascontiguousarray(ent.to_hf(_get(tree, ent.path))), dtype)


def top_to_hf(tree: dict, cfg: ModelConfig, dtype) -> Iterator[tuple[str, np.ndarray]]:
    for ent in top_entries(cfg):
        yield ent.hf, _cast(np.ascontiguousarray(ent.to_hf(_get(tree, ent.path))), dtype)


def check_tensors(ckpt: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    """Names and shapes of the checkpoint exactly match the config, or one error says what differs."""
    expected = hf_tensor_shapes(cfg)
    present = {n for n in ckpt.names() if not n.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.directory}: tensor '{missing[0]}' is missing{more}")
    extra = sorted(present - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: unexpected tensor '{extra[0]}'{more} "
                              "(does config.json match these weights?)")
    for name, shape in expected.items():
        if ckpt.shape(name) != tuple(shape):
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor '{name}' has shape {list(ckpt.shape(name))}, "
                                  f"config.json implies {list(shape)}")


def stacked_groups(cfg: ModelConfig) -> list[tuple[str, range]]:
    """(parameter-tree key, HF layer indices) for each stacked layer group."""
    return [(g.name, g.layers) for g in cfg.layer_groups()]


def params_from_hf(ckpt: SafetensorsCheckpoint, cfg: ModelConfig, dtype, shardings: dict | None = None) -> dict:
    """The parameter tree as device arrays, placed by `shardings` (a pure dict like the tree) when given.

    Each stacked parameter is filled layer by layer into one host buffer and sent to its devices before the
    next, so host memory peaks near one stacked parameter, and no device ever holds more than its shards.
    """
    def place(path: tuple, value: np.ndarray):
        return jnp.asarray(value) if shardings is None else jax.device_put(value, _get(shardings, path))

    tree: dict = {}
    for ent in top_entries(cfg):
        _set(tree, ent.path, place(ent.path, _cast(ent.to_ours(ckpt.get(ent.hf)), np.dtype(dtype))))
    for key, layers in stacked_groups(cfg):
        group = tree.setdefault(key, {})
        for ent in layer_entries(cfg, is_moe_layer(cfg, layers[0])):
            stack = None
            for j, i in enumerate(layers):
                one = entry_from_hf(ckpt.get, cfg, i, ent, dtype)
                if stack is None:
                    stack = np.empty((len(layers), *one.shape), one.dtype)
                stack[j] = one
            _set(group, ent.path, place((key, *ent.path), stack))
    return tree


def resolve_dtype(dtype) -> np.dtype:
    names = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(names)}")
        return np.dtype(names[dtype])
    return np.dtype(dtype)
