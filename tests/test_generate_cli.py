"""`dsv2 generate` on a saved tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from dsv2_jax import generate, load_model
from dsv2_jax.cli import main


def test_generate_prompt_ids_json(hf_v2, capsys):
    path = hf_v2[0]
    argv = ["generate", "--checkpoint", str(path), "--prompt-ids", "5,6,7,8,9", "--max-new-tokens", "6",
            "--dtype", "float32", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    want = generate(load_model(path), [[5, 6, 7, 8, 9]], 6, eos_id=2)[0]  # config eos_token_id is 2
    assert record["prompt_ids"] == [5, 6, 7, 8, 9] and record["new_ids"] == want
    assert record["cache_bytes"] == (24 + 8) * 3 * 2 * 16 and record["tokens_per_s"] > 0


def test_generate_on_a_mesh_gives_the_same_ids(hf_v2, capsys):
    argv = ["generate", "--checkpoint", str(hf_v2[0]), "--prompt-ids", "5,6,7,8,9", "--max-new-tokens", "6",
            "--dtype", "float32", "--json"]
    assert main(argv) == 0
    single = json.loads(capsys.readouterr().out)["new_ids"]
    assert main([*argv, "--mesh", "tensor=2,expert=4"]) == 0
    assert json.loads(capsys.readouterr().out)["new_ids"] == single


@pytest.mark.parametrize("extra, message", [
    (["--prompt-ids", "1,x", "--json"], "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", "1,999", "--json"], "prompt 0: token id 999 outside the vocabulary"),
    (["--prompt-ids", "", "--json"], "prompt 0 is empty"),
])
def test_generate_bad_input_is_one_line_exit_2(hf_v2, capsys, extra, message):
    assert main(["generate", "--checkpoint", str(hf_v2[0]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv2 generate: error: ") and message in err and "\n" not in err


def test_generate_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "1", "--json"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_generate_text_streams_with_byte_tokenizer(hf_v2, capsys):
    pytest.importorskip("dsv2_jax.tokenizer")
    # The tiny checkpoint has no tokenizer.json (byte-level fallback) and 160 ids: ASCII letters < 128 fit.
    assert main(["generate", "--checkpoint", str(hf_v2[0]), "--prompt", "Hi", "--max-new-tokens", "4",
                 "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "tok/s" in captured.err
