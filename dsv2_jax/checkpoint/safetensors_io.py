"""Safetensors read/write with numpy alone (no torch), bf16 included, one tensor at a time.

Reading copies out only the tensor asked for with a positioned read (no memory map, so pages of tensors
already read never count against the process), so a converter can stream a 236B checkpoint. Every failure is a `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or does not fit the config; the message says which."""


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n} exceeds file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape, dtype = tuple(info["shape"]), info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}': malformed header entry") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (begin, end, *shape)):
            raise CheckpointError(f"{path}: tensor '{name}': offsets {info['data_offsets']} and shape "
                                  f"{info['shape']} must be non-negative integers")
        if end > data_size or begin > end:
            raise CheckpointError(f"{path}: tensor '{name}': data [{begin}, {end}) runs past the end of the file "
                                  f"({data_size} data bytes): file truncated or corrupt")
        if dtype in DTYPES and (end - begin) != int(np.prod(shape)) * DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor '{name}': {end - begin} bytes do not hold {dtype}{list(shape)}")
        spans.append((begin, end, name))
    reach, owner = 0, None  # the furthest byte any earlier tensor occupies, and whose it is
    for begin, end, name in sorted(spans):
        if begin < reach and end > begin:  # empty tensors occupy no bytes
            raise CheckpointError(f"{path}: tensor '{name}': data [{begin}, {end}) overlaps tensor '{owner}'")
        if end > reach:
            reach, owner = end, name
    return header, 8 + n


class SafetensorsCheckpoint:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: invalid index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(f"{self.directory}: only pickle checkpoints ({', '.join(pickles)}); pickles are "
                                      "never loaded — convert them to safetensors first")
            raise CheckpointError(f"{self.directory}: no *.safetensors files")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for fname in files:
            path = self.directory / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
            header, start = _read_header(path)
            for name, info in header.items():
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor '{name}' also stored in {self._where[name][0].name}")
                self._where[name] = (path, info, start)

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def dtype_name(self, name: str) -> str:
        """The stored safetensors dtype string ("BF16", "F32", ... possibly one we cannot read, e.g. "I32")."""
        return self._where[name][1]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """A private in-memory copy of one tensor, in its stored dtype."""
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing")
        path, info, start = self._where[name]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {info['dtype']} "
                                  f"(supported: {', '.join(DTYPES)})")
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        with open(path, "rb") as f:
            arr = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        return arr.reshape(info["shape"])

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can release a checkpoint explicitly."""


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                      get: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Streams tensors into one safetensors file (header first, then get(name) one at a time).

    Written to `path.tmp` and renamed, so a failure never leaves a half-written file. Returns bytes written.
    """
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, dtype, shape in specs:
                arr = np.ascontiguousarray(get(name))
                if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
                    raise CheckpointError(f"{path}: tensor '{name}' is {arr.dtype}{list(arr.shape)}, "
                                          f"expected {np.dtype(dtype)}{list(shape)}")
                f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return 8 + len(blob) + offset
