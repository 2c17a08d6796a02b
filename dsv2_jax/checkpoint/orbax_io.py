"""Orbax checkpoints of a parameter tree, written and read one slice at a time.

Orbax saves whole arrays; a 236B model's stacked expert weights ([L, E, D, F], ~150 GB each) cannot be held
in memory at once. So the writer produces exactly what `StandardCheckpointer.save` would for arrays sharded
along their leading (layers) axis: one zarr3 array per leaf inside the checkpoint's OCDBT store, with Orbax's
own TensorStore spec (`ArrayWriteSpec`, zstd, shard = one layer slice), plus the `_METADATA` tree file built by
Orbax's `InternalTreeMetadata`. Slices are then written with TensorStore as they are produced. The result
restores with plain `ocp.StandardCheckpointer().restore(path, target)`, each device reading only its shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.metadata import tree as tree_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types as ser_types

from dsv2_jax.parallel.sharding import EXPERTS

METADATA_FILE = "_METADATA"  # Orbax's pytree metadata file: its presence marks an Orbax checkpoint
CHUNK_BYTES = 64 << 20  # zarr chunk target inside each per-layer shard; routed experts get one chunk each
WRITER_CACHE_BYTES = 8 << 20


def param_name(path: tuple) -> str:
    """Orbax's on-disk name for a tree leaf (keys joined by dots)."""
    return ".".join(str(k) for k in path)


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, prefix + (k,)) if isinstance(v, Mapping) else {prefix + (k,): v})
    return out


def unflatten(flat: Mapping[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


class LeafSpec:
    """Shape, dtype and logical axes of one leaf; `stacked` leaves are written one leading-axis slice at a time."""

    def __init__(self, shape, dtype, axes, stacked: bool):
        self.shape, self.dtype, self.axes, self.stacked = tuple(shape), np.dtype(dtype), tuple(axes), stacked

    @property
    def write_shape(self) -> tuple:
        return (1, *self.shape[1:]) if self.stacked else self.shape


class OrbaxTreeWriter:
    """Creates every array of the tree up front, takes slices in any order, writes `_METADATA` on `finish()`."""

    def __init__(self, directory: str | Path, leaves: Mapping[tuple, LeafSpec]):
        self.directory = epath.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self.leaves = dict(leaves)
        # Orbax's context caches up to 100 MB of OCDBT B-tree nodes, which a writer never rereads: keep it
        # small so memory stays flat however many layers are written.
        self._context = context = ts.Context({**ts_utils.get_ts_context(use_ocdbt=True).spec.to_json(),
                                              "cache_pool#ocdbt": {"total_bytes_limit": WRITER_CACHE_BYTES}})
        self._arrays = {}
        for path, leaf in self.leaves.items():
            shard_axes = tuple(i for i, a in enumerate(leaf.axes) if a == EXPERTS)  # one chunk per expert
            spec = ts_utils.ArrayWriteSpec(
                self.directory.as_posix(), param_name(path), global_shape=leaf.shape, write_shape=leaf.write_shape,
                dtype=leaf.dtype, chunk_byte_size=CHUNK_BYTES, shard_axes=shard_axes, use_zarr3=True, use_ocdbt=True)
            self._arrays[path] = ts.open(spec.json, create=True, context=context).result()

    def write(self, path: tuple, value: np.ndarray, index: int | None = None) -> None:
        """Writes a whole leaf (index None) or slice `index` of a stacked leaf; blocks until it is on disk."""
        leaf = self.leaves[path]
        want = leaf.shape if index is None else leaf.shape[1:]
        if tuple(value.shape) != want or value.dtype != leaf.dtype:
            raise ValueError(f"{param_name(path)}: got {value.dtype}{list(value.shape)}, "
                             f"expected {leaf.dtype}{list(want)}")
        target = self._arrays[path] if index is None else self._arrays[path][index]
        target.write(value).result()

    def finish(self) -> None:
        infos = unflatten({path: ser_types.ParamInfo(name=param_name(path), parent_dir=self.directory,
                                                     value_typestr="jax.Array", write_shape=leaf.write_shape,
                                                     use_zarr3=True, ts_context=self._context)
                           for path, leaf in self.leaves.items()})
        meta = tree_metadata.InternalTreeMetadata.build(infos, use_ocdbt=True, use_zarr3=True)
        (self.directory / METADATA_FILE).write_text(json.dumps(meta.to_json()))
        self._arrays.clear()


class OrbaxTreeReader:
    """Reads single leaves or leading-axis slices of an Orbax pytree checkpoint (any Orbax writer's).

    `prefix` / `suffix` select a subtree: a training checkpoint stores parameter p as ("params", *p, "value").
    """

    def __init__(self, directory: str | Path, prefix: tuple = (), suffix: tuple = ()):
        self.directory = epath.Path(directory)
        meta_file = self.directory / METADATA_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{self.directory}: not an Orbax checkpoint (no {METADATA_FILE})")
        meta = json.loads(meta_file.read_text())
        self._use_zarr3 = bool(meta.get("use_zarr3"))
        self._use_ocdbt = bool(meta.get("use_ocdbt"))
        self._context = ts_utils.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._prefix, self._suffix = tuple(prefix), tuple(suffix)
        stored = [tuple(k["key"] for k in entry["key_metadata"]) for entry in meta["tree_metadata"].values()]
        n, m = len(self._prefix), len(self._suffix)
        self.paths = [p[n:len(p) - m] for p in stored
                      if p[:n] == self._prefix and p[len(p) - m:] == self._suffix and len(p) > n + m]
        self._arrays: dict[tuple, ts.TensorStore] = {}

    def array(self, path: tuple) -> ts.TensorStore:
        if path not in self._arrays:
            stored = (*self._prefix, *path, *self._suffix)
            spec = ts_utils.ArrayReadSpec(self.directory.as_posix(), param_name(stored), self._use_zarr3,
                                          use_ocdbt=self._use_ocdbt)
            self._arrays[path] = ts.open(spec.json, open=True, context=self._context).result()
        return self._arrays[path]

    def read(self, path: tuple, index: int | None = None) -> np.ndarray:
        arr = self.array(path)
        return (arr if index is None else arr[index]).read().result()


def restore_tree(directory: str | Path, target: dict) -> dict:
    """Plain Orbax restore of a pytree checkpoint into `target` (a pure dict of jax.ShapeDtypeStruct with
    shardings): each device reads its own shard, cast to the target dtypes on the fly."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(epath.Path(directory).absolute(), target)


def abstract_targets(abstract_state, shardings: Mapping | None = None) -> dict:
    """Pure dict of ShapeDtypeStruct for restore; leaves without a given sharding go to this process's first
    device."""
    from flax import nnx

    shapes = nnx.to_pure_dict(abstract_state)
    flat_shard = flatten(shardings) if shardings is not None else {}
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return unflatten({p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_shard.get(p, one_device))
                      for p, s in flatten(shapes).items()})
