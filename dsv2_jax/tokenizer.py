"""Tokenizers: a dependency-free byte-level fallback and a HF `tokenizers` wrapper.

Both expose the same small surface used by the data pipeline and the CLI:
`encode(str) -> list[int]` (content only, no special tokens), `decode`,
`vocab_size`, and optional `bos_id` / `eos_id` / `pad_id` (None if absent).
Only JSON files are ever read: no pickle, no remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer


class TextTokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 = bos, 257 = eos, 258 = pad."""

    bos_id = 256
    eos_id = 257
    pad_id = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # Special ids carry no text; 'replace' keeps decode total for partial
        # multi-byte sequences (e.g. a sample cut mid-character).
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


class HFTokenizer:
    """A `tokenizer.json` loaded with the Rust `tokenizers` library.

    bos/eos/pad ids come from `tokenizer_config.json` (token strings, HF
    style) or else `config.json` (`*_token_id` ints) in the same directory.
    """

    def __init__(self, tokenizer_json: str | Path):
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path}: corrupt or unsupported tokenizer.json ({e})") from None
        self.path = path
        self.bos_id, self.eos_id, self.pad_id = self._special_ids(path.parent)

    def _special_ids(self, directory: Path) -> tuple[int | None, ...]:
        names = ("bos", "eos", "pad")
        tok_cfg = directory / "tokenizer_config.json"
        if tok_cfg.is_file():
            cfg = _read_json(tok_cfg)
            return tuple(self._token_id(cfg.get(f"{n}_token"), tok_cfg) for n in names)
        model_cfg = directory / "config.json"
        if model_cfg.is_file():
            cfg = _read_json(model_cfg)
            return tuple(self._int_id(cfg.get(f"{n}_token_id"), model_cfg) for n in names)
        return (None, None, None)

    def _token_id(self, token, source: Path) -> int | None:
        if isinstance(token, dict):  # AddedToken serialisation: {"content": ...}
            token = token.get("content")
        if token is None:
            return None
        if not isinstance(token, str):
            raise ValueError(f"{source}: special token must be a string, got {token!r}")
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"{source}: special token {token!r} is not in the vocabulary")
        return tid

    def _int_id(self, value, source: Path) -> int | None:
        if isinstance(value, list):  # some configs list several eos ids; use the first
            value = value[0] if value else None
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < self.vocab_size:
            raise ValueError(f"{source}: invalid special token id {value!r}")
        return value

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # The data pipeline adds bos/eos itself; a post-processor must not double them.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """None -> ByteTokenizer; a directory holding tokenizer.json (or that file) -> HFTokenizer."""
    if path is None:
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in directory: {p}")
        p = p / "tokenizer.json"
    return HFTokenizer(p)
