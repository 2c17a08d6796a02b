"""Server text handling: stop strings across token boundaries, partial UTF-8, the sandboxed chat template."""

from __future__ import annotations

import json

import pytest

from dsv2_jax.serve.chat_template import ChatTemplate
from dsv2_jax.serve.text_stream import TextStream
from dsv2_jax.tokenizer import ByteTokenizer


def pushes(stop, text):
    s = TextStream(ByteTokenizer(), stop)
    sent = [s.push(b) for b in text.encode()]
    return "".join(sent) + s.flush(), s.stopped, sent


def test_stop_string_split_over_tokens_is_never_sent():
    out, stopped, sent = pushes(["END"], "abc ENx ENDtail")
    assert out == "abc ENx " and stopped
    assert "".join(sent[:6]) == "abc " and "".join(sent[:7]) == "abc ENx"  # "EN" held back until it is not "END"


def test_partial_utf8_is_held_back():
    out, stopped, sent = pushes([], "é!")
    assert sent[0] == "" and out == "é!" and not stopped


def test_chat_template_renders_and_is_sandboxed(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}"}))
    t = ChatTemplate.from_checkpoint(tmp_path)
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>user: hi\nassistant:"
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="chat template"):
        evil.render([])
    assert ChatTemplate.from_checkpoint(tmp_path / "missing") is None
