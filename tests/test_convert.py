"""`dsv2 convert` / `dsv2 export`: bit-identical round trips, logits parity, sharded restore, bad input."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from safetensors.numpy import save_file

import dsv2_jax
from dsv2_jax.cli import main
from dsv2_jax.checkpoint.convert import PARAMS_DIR
from dsv2_jax.checkpoint.safetensors_io import SafetensorsCheckpoint

ROOT = Path(__file__).resolve().parent.parent
IDS = np.array([[1, 5, 9, 33, 120, 7, 64, 2, 150, 11, 3, 99]])


def cli(*argv) -> int:
    return main([*map(str, argv), "--quiet"])


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = SafetensorsCheckpoint(a_dir), SafetensorsCheckpoint(b_dir)
    assert a.names() == b.names()
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bit-identical, NaN patterns and signed zeros included


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    """(name, hf dir, converted dir, torch model) for each tiny config."""
    name, hf_dir, torch_model = hf_checkpoint
    out = tmp_path_factory.mktemp(f"conv_{name}") / "orbax"
    assert cli("convert", hf_dir, out) == 0
    return name, hf_dir, out, torch_model


def test_round_trip_is_bit_identical_fp32(converted, tmp_path):
    name, hf_dir, out, torch_model = converted
    assert sorted(p.name for p in out.iterdir()) == [".dsv2-output.json", "config.json", "dsv2_config.json",
                                                      "generation_config.json", "params"]
    back = tmp_path / "back"
    assert cli("export", out, back, "--max-shard-size", "150KB") == 0
    assert_same_tensors(hf_dir, back)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # transformers itself loads the export and computes the same logits as the original model.
    from transformers import DeepseekV2ForCausalLM

    reloaded = DeepseekV2ForCausalLM.from_pretrained(back).float().eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(IDS)).logits.numpy()
        got = reloaded(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_array_equal(got, want)


def _params(model) -> dict:
    from flax import nnx

    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_converted_model_equals_hf_loading(converted):
    name, hf_dir, out, _ = converted
    from_hf, from_orbax = dsv2_jax.load_model(hf_dir), dsv2_jax.load_model(out)
    want, got = _params(from_hf), _params(from_orbax)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
    if name == "v2":  # identical parameters give identical logits; one forward pass shows it end to end
        np.testing.assert_array_equal(np.asarray(from_orbax(IDS)), np.asarray(from_hf(IDS)))


def test_sharded_restore_reads_into_target_shardings(hf_v2, tmp_path):
    hf_dir = hf_v2[0]
    out = tmp_path / "orbax"
    assert cli("convert", hf_dir, out) == 0
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("tensor", "expert"))  # no fsdp axis: embed replicated
    model = dsv2_jax.load_model(out, mesh=mesh, dtype="bfloat16")  # placed by sharding.LOGICAL_RULES
    w_gate = model.moe_layers.mlp.w_gate[...]
    assert w_gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, "tensor")
    assert {s.data.shape for s in w_gate.addressable_shards} == {(w_gate.shape[0], 2, w_gate.shape[2],
                                                                   w_gate.shape[3] // 2)}
    assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    assert model.moe_layers.mlp.w_router[...].dtype == np.float32 and w_gate.dtype == jax.numpy.bfloat16
    want = _params(dsv2_jax.load_model(hf_dir, dtype="bfloat16"))
    for k, v in _params(model).items():
        assert v.tobytes() == want[k].tobytes(), k


def test_bf16_round_trip_and_dtype_flag(hf_v2, tmp_path):
    hf_dir, torch_model = hf_v2
    bf16_dir = tmp_path / "hf_bf16"
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(bf16_dir)  # the fixture is shared: no in-place cast
    assert cli("convert", bf16_dir, tmp_path / "ob") == 0
    assert json.loads((tmp_path / "ob" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli("export", tmp_path / "ob", tmp_path / "back") == 0
    assert_same_tensors(bf16_dir, tmp_path / "back")
    # fp32 source stored as bf16: every tensor is the round-to-nearest-even cast of the original.
    assert cli("convert", hf_dir, tmp_path / "ob32", "--dtype", "bfloat16") == 0
    assert cli("export", tmp_path / "ob32", tmp_path / "back32", "--dtype", "float32") == 0
    src, back = SafetensorsCheckpoint(hf_dir), SafetensorsCheckpoint(tmp_path / "back32")
    for name in src.names():
        want = src.get(name) if name.endswith("mlp.gate.weight") else src.get(name).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(back.get(name), want.astype(np.float32), err_msg=name)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy of an HF dir whose tensors (a name → array dict) went through `edit`."""
    dst.mkdir()
    shutil.copyfile(src / "config.json", dst / "config.json")
    ckpt = SafetensorsCheckpoint(src)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _corrupt_header(d: Path):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))


def _set_config(d: Path, **kw):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **kw}))


def _pickle_only(d: Path):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


Q_B = "model.layers.1.self_attn.q_b_proj.weight"
BAD_INPUTS = {
    # name: (tensor edit or None, directory edit or None, text the error must contain)
    "truncated": (None, _truncate, "truncated"),
    "corrupt_header": (None, _corrupt_header, "corrupt safetensors header"),
    "missing_tensor": (lambda t: t.pop(Q_B), None, f"'{Q_B}' is missing"),
    "extra_tensor": (lambda t: t.update({"model.layers.1.mlp.bonus.weight": np.ones(3, np.float32)}), None,
                     "unexpected tensor 'model.layers.1.mlp.bonus.weight'"),
    "wrong_shape": (lambda t: t.update({Q_B: t[Q_B][:-1]}), None, f"'{Q_B}' has shape"),
    "int32_weight": (lambda t: t.update({Q_B: t[Q_B].astype(np.int32)}), None, f"'{Q_B}': unsupported dtype I32"),
    "config_mismatch": (None, lambda d: _set_config(d, num_hidden_layers=2), "unexpected tensor 'model.layers.2."),
    "pickle_only": (None, _pickle_only, "pytorch_model.bin"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_leaves_nothing(case, hf_v2, tmp_path, capsys):
    edit_tensors, edit_dir, needle = BAD_INPUTS[case]
    bad = _rewrite(hf_v2[0], tmp_path / "bad", edit_tensors or (lambda t: None))
    if edit_dir:
        edit_dir(bad)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli("convert", bad, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv2 convert: error:"), err
    assert needle in err[0] and str(bad) in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no OUT_DIR, no temp directory


def test_existing_output_needs_force(converted, tmp_path, capsys):
    _, hf_dir, _, _ = converted
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    capsys.readouterr()
    assert cli("convert", hf_dir, out) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and str(out) in err and "\n" not in err
    assert (out / "keep.txt").exists()
    assert cli("convert", hf_dir, out, "--force") == 2  # --force replaces only what dsv2 wrote
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert cli("convert", hf_dir, out, "--force") == 0  # an empty directory holds nothing to lose
    assert cli("convert", hf_dir, out, "--force") == 0
    assert (out / PARAMS_DIR).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_mid_write_leaves_nothing(hf_v2, tmp_path, monkeypatch, capsys):
    from dsv2_jax.checkpoint import orbax_io

    calls = []
    real_write = orbax_io.OrbaxTreeWriter.write

    def failing_write(self, path, value, index=None):
        calls.append(path)
        if len(calls) == 6:
            raise OSError("disk full (simulated)")
        return real_write(self, path, value, index)

    monkeypatch.setattr(orbax_io.OrbaxTreeWriter, "write", failing_write)
    capsys.readouterr()
    assert cli("convert", hf_v2[0], tmp_path / "out") == 2
    assert capsys.readouterr().err.strip() == "dsv2 convert: error: disk full (simulated)"
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_a_non_converted_dir(hf_v2, tmp_path, capsys):
    capsys.readouterr()
    assert cli("export", hf_v2[0], tmp_path / "back") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv2 export: error:") and "dsv2_config.json" in err
    assert not (tmp_path / "back").exists()


def test_bench_convert_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_convert.py"), "--layers", "1", "2",
                           "--hidden", "64", "--experts", "8", "--moe-inter", "32", "--vocab", "256"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["layers"] for r in rows[:2]] == [1, 2]
    assert 0.8 < rows[2]["peak_rss_ratio"]["convert_peak_rss_mb"] < 1.25


def test_one_dtype_policy_keeps_exactly_the_router_fp32(hf_v2):
    """Model init, loading and the trainer's compute cast all follow model.precision: in a bf16 model only the
    router stays fp32 (matched by name, not as a substring of the path)."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax.model.precision import cast_params, param_dtype
    from dsv2_jax.model.transformer import abstract_model

    loaded = dsv2_jax.load_model(hf_v2[0], "bfloat16")
    fp32 = nnx.state(abstract_model(loaded.config, jnp.float32))
    trees = {"loaded": nnx.state(loaded), "built": nnx.state(abstract_model(loaded.config, jnp.bfloat16)),
             "cast": jax.eval_shape(lambda s: cast_params(s, jnp.bfloat16), fp32)}
    for what, tree in trees.items():
        dtypes = {tuple(p): v.get_value().dtype for p, v in nnx.to_flat_state(tree)}
        assert {p for p, d in dtypes.items() if d == jnp.float32} == {("moe_layers", "mlp", "w_router")}, what
        assert {d for d in dtypes.values()} == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}, what
    assert param_dtype(("mlp", "w_router_bias"), jnp.bfloat16) == jnp.bfloat16
