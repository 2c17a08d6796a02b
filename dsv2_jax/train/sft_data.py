"""Supervised fine-tuning data: chat or prompt/completion JSONL → packed batches whose loss covers only the
answers.

Records (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (at least one assistant turn)
    {"prompt": "...", "completion": "..."}
Chats are rendered with the checkpoint's chat template (`chat_template` of tokenizer_config.json, run in
jinja2's sandbox) and tokenized with its tokenizer.json; without a template, DeepSeek-V2-Chat's format
(`User: …\\n\\nAssistant: …<eos>`) is built directly. Each token carries a weight: 1 for assistant turns (their
eos included) and completions, 0 for everything else. The weights travel through grain's first-fit packing
beside the tokens, and data._finalize multiplies them into `loss_mask`, so the cross-entropy (a mean over
loss_mask) is taken over answer tokens only, however records are packed.

Examples longer than seq_len are truncated (counted); a record that is malformed, or has no answer token within
seq_len, fails with `file:line: reason` — or, with skip_bad_records, is skipped and counted.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import grain
import jax
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from dsv2_jax.train.data import _expand, _finalize

ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A malformed SFT record; the message starts with file:line."""


def _first_record(path: Path):
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None
    return None


def is_sft(tc, held_out: bool = False) -> bool:
    """data_format sft, or auto with JSONL inputs whose first record holds `messages` or `prompt`."""
    files = tc.eval_data if held_out else tc.data
    if tc.data_format != "auto":
        return tc.data_format == "sft" and bool(files)
    if not files:
        return False
    expanded = _expand(files)
    if not all(kind == "jsonl" for kind, _ in expanded):
        return False
    first = _first_record(expanded[0][1])
    return isinstance(first, dict) and "text" not in first and ("messages" in first or "prompt" in first)


class ChatFormat:
    """Turns a record into (token ids, weights) with a tokenizer and, if present, its chat template."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.template = self.bos_token = self.eos_token = None
        path = getattr(tokenizer, "path", None)
        cfg_file = Path(path).parent / "tokenizer_config.json" if path is not None else None
        if cfg_file is not None and cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: use the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                def raise_exception(message):
                    raise ValueError(message)

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = raise_exception
                self.template = env.from_string(template)
                self.bos_token, self.eos_token = (_token_text(cfg.get(k)) for k in ("bos_token", "eos_token"))

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def _special(self, tid) -> list[int]:
        return [] if tid is None else [tid]

    def chat(self, messages: list[dict]) -> list[tuple[list[int], float]]:
        """(ids, weight) segments of a conversation."""
        if self.template is None:
            segs = [(self._special(self.tok.bos_id), 0.0)]
            for m in messages:
                if m["role"] == "assistant":
                    segs += [(self.tok.encode("Assistant:"), 0.0),
                             (self.tok.encode(" " + m["content"]) + self._special(self.tok.eos_id), 1.0)]
                elif m["role"] == "user":
                    segs.append((self.tok.encode(f"User: {m['content']}\n\n"), 0.0))
                else:
                    segs.append((self.tok.encode(f"{m['content']}\n\n"), 0.0))
            return segs
        texts, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._render(messages[:i], True)
            full = self._render(messages[:i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError("the chat template does not render the conversation prefix by prefix")
            texts += [(prefix[len(done):], 0.0), (full[len(prefix):], 1.0)]
            done = full
        texts.append((self._render(messages, False)[len(done):], 0.0))
        return [(self.tok.encode(t), w) for t, w in texts if t]

    def completion(self, prompt: str, completion: str) -> list[tuple[list[int], float]]:
        return [(self._special(self.tok.bos_id) + self.tok.encode(prompt), 0.0),
                (self.tok.encode(completion) + self._special(self.tok.eos_id), 1.0)]


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _check_record(obj) -> str | None:
    """Why a parsed record is unusable, or None."""
    if not isinstance(obj, dict):
        return "record is not a JSON object"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"messages[{j}] must be {{'role': one of {list(ROLES)}, 'content': string}}"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message (nothing to train on)"
        return None
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        if not obj["completion"]:
            return "empty 'completion' (nothing to train on)"
        return None
    return "record has neither 'messages' nor 'prompt'/'completion'"


def encode_record(fmt: ChatFormat, obj: dict, seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids int32 [n], weights float32 [n], truncated) with n <= seq_len."""
    segs = fmt.chat(obj["messages"]) if "messages" in obj else fmt.completion(obj["prompt"], obj["completion"])
    ids = np.asarray([t for s, _ in segs for t in s], np.int32)
    weights = np.asarray([w for s, w in segs for _ in s], np.float32)
    truncated = len(ids) > seq_len
    return ids[:seq_len], weights[:seq_len], truncated


def load_examples(files, tokenizer, seq_len: int, skip_bad: bool = False,
                  vocab_size: int | None = None) -> tuple[list, dict]:
    """Every record of the JSONL files tokenized: ([(ids, weights)], counts)."""
    fmt = ChatFormat(tokenizer)
    examples, counts, first_bad = [], {"records": 0, "skipped": 0, "truncated": 0}, None
    for _, path in _expand(files):
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    try:
                        obj = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise BadRecord(f"{where}: line is not valid JSON") from None
                    reason = _check_record(obj)
                    if reason is None:
                        try:
                            ids, weights, truncated = encode_record(fmt, obj, seq_len)
                        except Exception as e:  # the template's own raise_exception / rendering errors
                            raise BadRecord(f"{where}: {e}") from None
                        if not weights[1:].any():
                            reason = f"no answer token within seq_len {seq_len}"
                    if reason is not None:
                        raise BadRecord(f"{where}: {reason}")
                except BadRecord as e:
                    if not skip_bad:
                        raise
                    counts["skipped"] += 1
                    first_bad = first_bad or str(e)
                    continue
                counts["records"] += 1
                counts["truncated"] += int(truncated)
                examples.append((ids, weights))
    if first_bad and jax.process_index() == 0:
        print(f"sft data: skipped {counts['skipped']} bad records (first: {first_bad})", file=sys.stderr)
    if not examples:
        raise ValueError(f"no usable SFT records in {', '.join(map(str, files))}")
    return examples, counts


def _as_example(ex) -> dict[str, np.ndarray]:
    ids, weights = ex
    return {"inputs": ids, "weights": weights}


def make_sft_dataset(tc, tokenizer, held_out: bool = False, *, process_index: int | None = None,
                     process_count: int | None = None) -> grain.IterDataset:
    """Packed SFT batches (the batch dict of dsv2_jax.train.data; loss_mask zero on non-answer tokens)."""
    files = list(tc.eval_data if held_out else tc.data)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    examples, _ = load_examples(files, tokenizer, tc.seq_len, tc.skip_bad_records)
    if len(examples) < process_count:
        raise ValueError(f"{len(examples)} SFT records, fewer than process_count {process_count}")
    batch = tc.global_batch // process_count
    ds = grain.MapDataset.source(examples[process_index::process_count])
    if not held_out:
        ds = ds.shuffle(tc.seed)
    ds = ds.repeat(1 if held_out else None).map(_as_example).to_iter_dataset()
    ds = FirstFitPackIterDataset(ds, length_struct={"inputs": tc.seq_len, "weights": tc.seq_len},
                                 num_packing_bins=batch, seed=tc.seed, shuffle_bins=not held_out)
    pad_id = 0 if tokenizer.pad_id is None else tokenizer.pad_id
    return ds.batch(batch).map(functools.partial(_finalize, batch=batch, pad_id=pad_id))
