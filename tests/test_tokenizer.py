import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dsv2_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

CORPUS = ["hello world", "hello there, world", "the quick brown fox", "jumps over the lazy dog"] * 4


def _train_bpe(directory, config: dict | None = None, config_name="tokenizer_config.json"):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / config_name).write_text(json.dumps(config))
    return tok


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🚀\n\ttab"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)


def test_byte_decode_skips_specials_and_replaces_bad_bytes():
    tok = ByteTokenizer()
    assert tok.decode([256, *tok.encode("ok"), 257, 258]) == "ok"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # cut mid-character


def test_load_none_is_byte():
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_hf_tokenizer_with_tokenizer_config(tmp_path):
    raw = _train_bpe(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == raw.token_to_id("<s>") and tok.eos_id == raw.token_to_id("</s>")
    assert tok.pad_id == raw.token_to_id("<pad>")
    assert tok.vocab_size == raw.get_vocab_size()
    ids = tok.encode("hello world")
    assert ids and tok.bos_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "hello world"


def test_hf_tokenizer_config_json_ids_and_file_path(tmp_path):
    _train_bpe(tmp_path, {"bos_token_id": 1, "eos_token_id": [2, 3]}, config_name="config.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)


def test_hf_tokenizer_without_config_has_no_specials(tmp_path):
    _train_bpe(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, None)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)
    good = tmp_path / "good"
    good.mkdir()
    _train_bpe(good)
    (good / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(good)
    (good / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(good)
