"""The checkpoint's chat template (tokenizer_config.json `chat_template`), rendered in a jinja2 sandbox."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _token_text(value) -> str:
    if isinstance(value, dict):  # AddedToken serialisation
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise(message):
    raise TemplateError(message)


class ChatTemplate:
    """render(messages) → the prompt text, ending with the assistant turn's opening (add_generation_prompt)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        # HF's settings: trim_blocks/lstrip_blocks, tojson, raise_exception. The sandbox keeps a checkpoint's
        # template from reaching Python internals.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of `directory`/tokenizer_config.json, or None when there is none."""
        path = Path(directory) / "tokenizer_config.json"
        if not path.is_file():
            return None
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        source = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{path}: chat_template must be a string")
        try:
            return cls(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))
        except TemplateError as e:
            raise ValueError(f"{path}: chat_template does not parse ({e})") from None

    def render(self, messages: list[dict]) -> str:
        """Raises ValueError when the template rejects the conversation."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
