"""Grain input pipeline: documents -> tokens -> first-fit packed, per-host batches.

Pipeline (per host)::

    documents (text files | JSONL lines | ArrayRecord records)
      -> this host's shard  docs[process_index::process_count]
      -> shuffle(seed) + repeat(num_epochs)     (reshuffled every epoch)
      -> tokenize, prepend bos / append eos     (threaded, MapDataset.map)
      -> split docs longer than seq_len         (chunks overlap by one token)
      -> window-shuffle the pieces              (so a long doc spreads over batches)
      -> grain FirstFitPackIterDataset          (segment ids + positions)
      -> batch(global_batch // process_count) -> next-token targets, loss mask

Each batch is a dict of numpy arrays, all of shape [global_batch // process_count, seq_len]:

    inputs       int32    token ids (tokenizer pad id, or 0 if none, where segment_ids == 0)
    targets      int32    next token within the same segment (pad id elsewhere)
    segment_ids  int32    1, 2, ... per packed document in a row; 0 = padding
    positions    int32    position inside the segment, restarting at 0
    loss_mask    float32  1 where `targets` is a real next token of the same doc

Iterator state is exact and JSON-serialisable::

    ds = make_dataset(sources, tok, seq_len, global_batch, seed)
    it = iter(ds)
    state = it.get_state()          # dict of ints, json.dumps-able
    it2 = iter(ds); it2.set_state(state)   # continues exactly where `it` was

With Orbax (grain registers its handler with `ocp.args`)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=data_checkpoint_args(it)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=data_checkpoint_args(it, restore=True)))   # restores `it` in place

Every process writes its own `process_<i>-of-<n>.json`, so restore with the
same process count.
"""

from __future__ import annotations

import functools
import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import grain
from grain.checkpoint import CheckpointRestore, CheckpointSave
import jax
import numpy as np
from grain.experimental import (
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    FlatMapTransform,
    WindowShuffleIterDataset,
)

from dsv2_jax.tokenizer import TextTokenizer

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl",)

PathLike = str | Path


def default_corpus() -> list[str]:
    """The interpreter's own standard-library .py files: present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # Third-party packages may live under stdlib/site-packages; they vary per machine.
    return [
        str(p) for p in sorted(root.rglob("*.py"))
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ]


def _describe(paths: Sequence[PathLike]) -> str:
    """Short one-line naming of the inputs for error messages."""
    head = ", ".join(map(str, paths[:3]))
    return head + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")


def _kind(path: Path) -> str | None:
    if ".array_record" in path.name or path.suffix == ".arrayrecord":
        return "array_record"  # also matches sharded names like x.array_record-00000-of-00004
    if path.suffix in JSONL_SUFFIXES:
        return "jsonl"
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    return None


def _expand(sources: Sequence[PathLike]) -> list[tuple[str, Path]]:
    """(kind, file) for every input file, in a deterministic order."""
    files = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(f"data source does not exist: {p}")
        if p.is_dir():
            found = [(k, f) for f in sorted(p.rglob("*")) if f.is_file() and (k := _kind(f))]
            if not found:
                raise ValueError(
                    f"no usable files in directory {p} (want {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
                    ", .array_record)")
            files += found
        else:
            files.append((_kind(p) or "text", p))  # an explicitly named file is one text document
    return files


def _read_text(path: str) -> str:
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def _index_jsonl(path: Path, field: str) -> np.ndarray:
    """Byte offsets of the non-empty documents; validates every line up front so
    a malformed line fails at construction, naming file and line."""
    offsets, pos = [], 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{path}:{lineno}: line is not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise ValueError(f"{path}:{lineno}: JSON object lacks string field {field!r}")
            if obj[field]:
                offsets.append(start)
    return np.asarray(offsets, dtype=np.int64)


def _read_jsonl(offset, *, path: str, field: str) -> str:
    with open(path, "rb") as f:
        f.seek(int(offset))
        return json.loads(f.readline())[field]


def _record_text(index: int, record: bytes, *, path: str, field: str) -> str:
    text = record.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text  # plain text that merely starts with a brace
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ValueError(f"{path}: record {index} is JSON without string field {field!r}")
        return obj[field]
    return text


def _documents(files: list[tuple[str, Path]], field: str) -> grain.MapDataset:
    """One MapDataset of document strings, concatenated across all files."""
    parts, texts = [], []

    def flush_texts():
        if texts:
            parts.append(grain.MapDataset.source(list(texts)).map(_read_text))
            texts.clear()

    for kind, path in files:
        if kind == "text":
            if path.stat().st_size:  # empty files are not documents
                texts.append(str(path))  # consecutive text files share one source
            continue
        flush_texts()
        if kind == "jsonl":
            offsets = _index_jsonl(path, field)
            if len(offsets):
                parts.append(grain.MapDataset.source(offsets).map(
                    functools.partial(_read_jsonl, path=str(path), field=field)))
        else:
            source = grain.sources.ArrayRecordDataSource([str(path)])
            if len(source):
                parts.append(grain.MapDataset.source(source).map_with_index(
                    functools.partial(_record_text, path=str(path), field=field)))
    flush_texts()
    if not parts:
        raise ValueError(f"empty corpus: no documents in {_describe([p for _, p in files])}")
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _tokenize(text: str, *, tokenizer: TextTokenizer) -> np.ndarray | None:
    ids = tokenizer.encode(text)
    if not ids:
        return None  # grain drops None elements; empty docs would be bos/eos noise
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return np.asarray(bos + ids + eos, dtype=np.int32)


class _SplitLong(FlatMapTransform):
    """Cuts a document into pieces of at most seq_len tokens for the packer.

    Consecutive pieces share one token (the last of one is the first of the
    next) so every next-token transition of the document is trained exactly once.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
        step = self.seq_len - 1
        return [{"inputs": tokens[s:s + self.seq_len]} for s in range(0, max(len(tokens) - 1, 1), step)]


def _finalize(packed: dict[str, np.ndarray], *, batch: int, pad_id: int) -> dict[str, np.ndarray]:
    inputs = packed["inputs"].astype(np.int32)
    seg = packed["inputs_segment_ids"].astype(np.int32)
    pos = packed["inputs_positions"].astype(np.int32)
    missing = batch - inputs.shape[0]
    if missing:  # last batch of a finite run: pad with empty rows, keeping shapes static for jit
        inputs, seg, pos = (np.pad(x, ((0, missing), (0, 0))) for x in (inputs, seg, pos))
    inputs = np.where(seg == 0, pad_id, inputs).astype(np.int32)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    targets = np.full_like(inputs, pad_id)
    targets[:, :-1] = np.where(same, inputs[:, 1:], pad_id)
    loss_mask = np.zeros(inputs.shape, np.float32)
    loss_mask[:, :-1] = same
    if "weights" in packed:  # SFT (sft_data.py): a target counts only where its token's weight is 1
        weights = np.pad(packed["weights"].astype(np.float32), ((0, missing), (0, 0)))
        loss_mask[:, :-1] *= weights[:, 1:]
    return {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos,
            "loss_mask": loss_mask}


def make_dataset(
    sources: PathLike | Sequence[PathLike] | None,
    tokenizer: TextTokenizer,
    seq_len: int,
    global_batch: int,
    seed: int = 0,
    *,
    text_field: str = "text",
    num_epochs: int | None = None,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle_window: int = 1024,
    num_threads: int = 2,
    prefetch: int = 32,
) -> grain.IterDataset:
    """Packed LM batches for this host; `iter()` it for a checkpointable iterator.

    sources: a path or list of paths (files or directories); None = default_corpus().
    num_epochs: None repeats forever (training); an int gives a finite pass whose
      last batch is padded with empty rows (segment_ids 0).
    process_index / process_count: default to jax's; override to simulate hosts.
    shuffle_window: pieces shuffled together after splitting (memory ~ window * seq_len).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (got {seq_len})")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} must be a positive multiple of process_count {process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1 (got {num_epochs})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) (got {seed})")
    if sources is None:
        sources = default_corpus()
    elif isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given")
    batch = global_batch // process_count

    docs = _documents(_expand(sources), text_field)
    if len(docs) < process_count:
        raise ValueError(f"corpus has {len(docs)} documents, fewer than process_count {process_count}")
    docs = docs[process_index::process_count]
    tokenize = functools.partial(_tokenize, tokenizer=tokenizer)
    # Guard against an endless repeat over documents that all tokenize to nothing.
    if not any(tokenize(docs[i]) is not None for i in range(len(docs))):
        raise ValueError(f"empty corpus: no tokens in the documents of {_describe(sources)}")

    if shuffle:
        docs = docs.shuffle(seed)
    docs = docs.repeat(num_epochs).map(tokenize)
    ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    ds = FlatMapIterDataset(ds, _SplitLong(seq_len))
    if shuffle and shuffle_window > 1:
        ds = WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
    ds = FirstFitPackIterDataset(ds, length_struct={"inputs": seq_len}, num_packing_bins=batch,
                                 seed=seed, shuffle_bins=shuffle)
    pad_id = 0 if tokenizer.pad_id is None else tokenizer.pad_id
    return ds.batch(batch).map(functools.partial(_finalize, batch=batch, pad_id=pad_id))


def data_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False):
    """Orbax args for the data iterator (`grain.checkpoint.CheckpointSave/Restore`)."""
    return CheckpointRestore(iterator) if restore else CheckpointSave(iterator)
