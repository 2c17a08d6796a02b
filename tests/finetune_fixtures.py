"""A tiny released-style checkpoint for the fine-tuning tests: transformers weights + a character tokenizer with
DeepSeek-V2-Chat's chat template, and small SFT sets."""

from __future__ import annotations

import json
import string

from conftest import LITE_STYLE, make_hf_checkpoint

# DeepSeek-V2-Chat's template (tokenizer_config.json of the release), verbatim in structure.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]


def write_char_tokenizer(path) -> int:
    """tokenizer.json (one token per printable ASCII character), tokenizer_config.json; returns the vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    return len(vocab)


def make_released(path, seed: int = 0):
    """HF dir (weights by transformers, bos 0 / eos 1 / pad 2) + tokenizer; returns the torch model."""
    model = make_hf_checkpoint(path, dict(LITE_STYLE, bos_token_id=0, eos_token_id=1), seed=seed, init_std=0.08)
    assert write_char_tokenizer(path) <= LITE_STYLE["vocab_size"]
    return model


QA = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Color of the sky?", "blue"),
      ("Opposite of hot?", "cold"), ("First letter?", "a"), ("Say hi.", "hi")]


def write_sft(path, n: int = 24, kind: str = "messages") -> None:
    with open(path, "w") as f:
        for i in range(n):
            q, a = QA[i % len(QA)]
            rec = ({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                   if kind == "messages" else {"prompt": q + " ", "completion": a})
            f.write(json.dumps(rec) + "\n")
