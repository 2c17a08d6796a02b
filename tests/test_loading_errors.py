"""Bad checkpoints fail with one clear error naming the file and tensor."""

import json
import shutil
import struct

import numpy as np
import pytest

import dsv2_jax
from dsv2_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint, write_safetensors


@pytest.fixture
def ckpt(tmp_path, hf_v2):
    path = tmp_path / "ckpt"
    shutil.copytree(hf_v2[0], path)
    return path


def rewrite(path, change):
    """Rewrites model.safetensors with change(dict of name -> array) applied."""
    src = SafetensorsCheckpoint(path)
    tensors = {n: src.get(n) for n in src.names()}
    src.close()
    change(tensors)
    write_safetensors(path / "model.safetensors", [(n, a.dtype, a.shape) for n, a in tensors.items()],
                      tensors.__getitem__)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(dsv2_jax.ConfigError, match="config.json not found"):
        dsv2_jax.load_model(ckpt)


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.experts.3.up_proj.weight' is missing"):
        dsv2_jax.load_model(ckpt)


def test_extra_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.9.self_attn.o_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.9"):
        dsv2_jax.load_model(ckpt)


def test_misshaped_tensor_or_mismatched_config(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": np.zeros((7, 24), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.kv_b_proj.weight' has shape \[7, 24\]"):
        dsv2_jax.load_model(ckpt)


def test_config_that_does_not_match_the_tensors(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.2."):
        dsv2_jax.load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*': .* truncated or corrupt"):
        dsv2_jax.load_model(ckpt)


def test_corrupt_header(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        dsv2_jax.load_model(ckpt)


def test_unsupported_dtype(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["dtype"] = "I32"  # same byte size as F32
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    f.write_bytes(bytes(data[:8]) + blob + bytes(data[8 + n:]))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight': unsupported dtype I32"):
        dsv2_jax.load_model(ckpt)


def test_pickle_only_checkpoint_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="only pickle checkpoints .*never loaded"):
        dsv2_jax.load_model(ckpt)
