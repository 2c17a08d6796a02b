"""HF safetensors ⇄ Orbax conversion, streamed one tensor at a time (loading: load.py).

A converted directory holds `params/` (an Orbax pytree checkpoint of the model's own parameter tree: layers
stacked [L, ...], experts stacked [E, ...]), `config.json` (HF dialect), `dsv2_config.json` (ModelConfig) and
any tokenizer files. Conversion walks the HF-name ⇄ parameter mapping of hf_checkpoint.py one parameter of
one layer at a time, so peak memory is about one layer's largest expert block whatever the layer count.
Outputs are built in a temporary directory beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import nnx
from tqdm import tqdm

from dsv2_jax.checkpoint.train_checkpoints import PARAMS_PREFIX, PARAMS_SUFFIX, latest_state_dir
from dsv2_jax.config import ModelConfig, to_hf_dict
from dsv2_jax.checkpoint.hf_checkpoint import (check_tensors, entry_from_hf, hf_layer_names, hf_tensor_shapes, is_moe_layer,
                                    layer_entries, layer_to_hf, resolve_dtype, stacked_groups, top_entries,
                                    top_to_hf)
from dsv2_jax.model.transformer import abstract_model
from dsv2_jax.checkpoint.orbax_io import METADATA_FILE, LeafSpec, OrbaxTreeReader, OrbaxTreeWriter, param_name
from dsv2_jax.checkpoint.safe_output import staged_output
from dsv2_jax.checkpoint.safetensors_io import DTYPES, INDEX_FILE, CheckpointError, SafetensorsCheckpoint, write_safetensors

PARAMS_DIR = "params"
HF_CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "dsv2_config.json"
# Copied through unchanged in both directions (tokenizer and generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
EXPORTED_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def is_orbax_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PARAMS_DIR / METADATA_FILE).is_file() or is_training_run(path)


def is_training_run(path: str | os.PathLike) -> bool:
    return (Path(path) / "checkpoints").is_dir() and (Path(path) / MODEL_CONFIG_FILE).is_file()


def leaf_specs(cfg: ModelConfig, dtype) -> dict[tuple, LeafSpec]:
    """Every parameter of the model (path → shape, dtype, logical axes), from the abstract model: no memory."""
    stacked = {key for key, _ in stacked_groups(cfg)}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg, dtype))):
        value = var.get_value()
        out[tuple(path)] = LeafSpec(value.shape, value.dtype, var.axes, stacked=path[0] in stacked)
    return out


def _converted_name(name: str) -> bool:
    return name in (PARAMS_DIR, HF_CONFIG_FILE, MODEL_CONFIG_FILE, *SIDE_FILES)


def _exported_name(name: str) -> bool:
    return name in (HF_CONFIG_FILE, INDEX_FILE, *SIDE_FILES) or bool(EXPORTED_SHARD.fullmatch(name))


def _converted_layout(path: Path) -> bool:
    """A `dsv2 convert` output from before the ownership marker (an exported HF layout is not recognisable:
    a downloaded checkpoint looks the same, so exports are replaced only when they carry the marker)."""
    return (path / PARAMS_DIR / METADATA_FILE).is_file() and (path / MODEL_CONFIG_FILE).is_file()


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = [name for name in SIDE_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


def _write_hf_config(cfg: ModelConfig, dtype: np.dtype, path: Path) -> None:
    path.write_text(json.dumps(dict(to_hf_dict(cfg), torch_dtype=np.dtype(dtype).name), indent=2))


def open_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[ModelConfig, SafetensorsCheckpoint]:
    """Config and tensors of an HF directory, validated up front (names, shapes, dtypes) before any writing."""
    cfg = ModelConfig.from_hf(Path(hf_dir))
    ckpt = SafetensorsCheckpoint(hf_dir)
    check_tensors(ckpt, cfg)
    for name in ckpt.names():
        if ckpt.dtype_name(name) not in DTYPES:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor '{name}': unsupported dtype "
                                  f"{ckpt.dtype_name(name)} (supported: {', '.join(DTYPES)})")
    return cfg, ckpt


def _stored_dtype(ckpt: SafetensorsCheckpoint) -> np.dtype:
    """The one dtype all tensors are stored in; a mixed checkpoint needs an explicit --dtype."""
    by_dtype: dict[str, list[str]] = {}
    for name in ckpt.names():
        by_dtype.setdefault(ckpt.dtype_name(name), []).append(name)
    if len(by_dtype) > 1:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_dtype.items()))
        raise CheckpointError(f"{ckpt.directory}: tensors are stored in several dtypes ({counts}); pass --dtype "
                              "(dtype=...) to convert them all to one explicitly")
    return DTYPES[next(iter(by_dtype))]


def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype=None, force: bool = False,
                        progress: bool = True) -> dict:
    """HF DeepSeek-V2 directory → converted Orbax directory. `dtype` None keeps the checkpoint's own dtype
    (refused for a checkpoint stored in several dtypes: then every tensor is cast to the `dtype` given).

    Returns {"bytes_read", "dtype", "side_files"}.
    """
    hf_dir = Path(hf_dir)
    cfg, ckpt = open_hf_checkpoint(hf_dir)
    dt = resolve_dtype(dtype) if dtype is not None else _stored_dtype(ckpt)
    total = sum(int(np.prod(s)) * DTYPES[ckpt.dtype_name(n)].itemsize for n, s in hf_tensor_shapes(cfg).items())
    with staged_output(out_dir, force, hf_dir, kind="convert", allowed=_converted_name,
                       layout=_converted_layout) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        def get(name: str) -> np.ndarray:
            arr = ckpt.get(name)
            bar.update(arr.nbytes)
            return arr

        writer = OrbaxTreeWriter(tmp / PARAMS_DIR, leaf_specs(cfg, dt))
        for ent in top_entries(cfg):
            writer.write(ent.path, np.ascontiguousarray(ent.to_ours(get(ent.hf)).astype(dt, copy=False)))
        for key, layers in stacked_groups(cfg):
            for j, i in enumerate(layers):
                for ent in layer_entries(cfg, is_moe_layer(cfg, i)):
                    writer.write((key, *ent.path), entry_from_hf(get, cfg, i, ent, dt), index=j)
        writer.finish()
        _write_hf_config(cfg, dt, tmp / HF_CONFIG_FILE)
        cfg.to_json(tmp / MODEL_CONFIG_FILE)
        side = _copy_side_files(hf_dir, tmp)
    return {"bytes_read": total, "dtype": dt.name, "side_files": side}


class _LazyTree:
    """Stands in for one layer's (or the top-level) parameter tree: a leaf is read from disk when indexed."""

    def __init__(self, reader: OrbaxTreeReader, prefix: tuple, index: int | None):
        self.reader, self.prefix, self.index = reader, prefix, index

    def __getitem__(self, key):
        path = (*self.prefix, key)
        if path in self.reader.paths:
            return self.reader.read(path, self.index)
        return _LazyTree(self.reader, path, self.index)


def _open_converted(ckpt_dir: Path) -> tuple[ModelConfig, OrbaxTreeReader]:
    cfg = ModelConfig.from_json(ckpt_dir / MODEL_CONFIG_FILE)
    reader = (OrbaxTreeReader(latest_state_dir(ckpt_dir), PARAMS_PREFIX, PARAMS_SUFFIX) if is_training_run(ckpt_dir)
              else OrbaxTreeReader(ckpt_dir / PARAMS_DIR))
    expected = leaf_specs(cfg, np.float32)
    missing = sorted(set(expected) - set(reader.paths))
    if missing:
        raise CheckpointError(f"{reader.directory}: parameter '{param_name(missing[0])}' is missing")
    extra = sorted(set(reader.paths) - set(expected))
    if extra:
        raise CheckpointError(f"{reader.directory}: unexpected parameter '{param_name(extra[0])}' "
                              f"(does {MODEL_CONFIG_FILE} match?)")
    for path, leaf in expected.items():
        shape = tuple(reader.array(path).shape)
        if shape != leaf.shape:
            raise CheckpointError(f"{reader.directory}: parameter '{param_name(path)}' has shape {list(shape)}, "
                                  f"{MODEL_CONFIG_FILE} implies {list(leaf.shape)}")
    return cfg, reader


def _hf_layout(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    """HF tensor names and shapes in the order `_hf_tensors` yields them."""
    names = [(ent.hf, ent.hf_shape) for ent in top_entries(cfg)]
    for _, layers in stacked_groups(cfg):
        for i in layers:
            names += list(hf_layer_names(cfg, i).items())
    return names


def _hf_tensors(reader: OrbaxTreeReader, cfg: ModelConfig, dtype) -> Iterator[tuple[str, np.ndarray]]:
    yield from top_to_hf(_LazyTree(reader, (), None), cfg, dtype)
    for key, layers in stacked_groups(cfg):
        for j, i in enumerate(layers):
            yield from layer_to_hf(_LazyTree(reader, (key,), j), cfg, i, dtype)


def _shard_files(layout: list[tuple[str, tuple]], itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple]]]:
    files: list[list] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = int(np.prod(shape)) * itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append((name, shape))
        size += nbytes
    return files


def export_orbax_to_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike, dtype=None, force: bool = False,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict:
    """Converted Orbax directory or `dsv2 train` workdir → HF safetensors directory loadable by transformers.

    `dtype` None keeps the stored dtype (the embedding's). Files above `max_shard_bytes` are split, with
    a model.safetensors.index.json. Returns {"bytes_written", "files", "dtype"}.
    """
    ckpt_dir = Path(ckpt_dir)
    cfg, reader = _open_converted(ckpt_dir)
    dt = resolve_dtype(dtype) if dtype is not None else np.dtype(reader.array(("embed",)).dtype.numpy_dtype)
    return write_hf_dir(cfg, reader, hf_dir, dt, ckpt_dir, force, max_shard_bytes, progress)


def write_hf_dir(cfg: ModelConfig, reader, hf_dir, dt: np.dtype, source_dir: Path, force: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict:
    """Writes the HF directory of a parameter tree; `reader.read(path, index)` gives a leaf or one layer of a
    stacked leaf (OrbaxTreeReader, or lora.py's merged view). Side files are copied from `source_dir`."""
    layout = _hf_layout(cfg)
    groups = _shard_files(layout, dt.itemsize, max_shard_bytes)
    fnames = (["model.safetensors"] if len(groups) == 1 else
              [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    total = sum(int(np.prod(shape)) * dt.itemsize for _, shape in layout)
    tensors = _hf_tensors(reader, cfg, dt)
    with staged_output(hf_dir, force, source_dir, kind="export", allowed=_exported_name,
                       layout=lambda _: False) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
        def get(name: str) -> np.ndarray:
            got, arr = next(tensors)
            assert got == name, (got, name)  # layout and generator walk the same tables in the same order
            bar.update(arr.nbytes)
            return arr

        for fname, group in zip(fnames, groups):
            write_safetensors(tmp / fname, [(n, dt, s) for n, s in group], get)
        if len(fnames) > 1:
            weight_map = {n: fname for fname, group in zip(fnames, groups) for n, _ in group}
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        _write_hf_config(cfg, dt, tmp / HF_CONFIG_FILE)
        _copy_side_files(source_dir, tmp)
    return {"bytes_written": total, "files": fnames, "dtype": dt.name}
