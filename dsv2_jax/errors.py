"""How a failure reads on one line (the CLI's `dsv2 CMD: error: ...` and warnings about skipped checkpoints)."""

from __future__ import annotations


MAX_CHARS = 400


def one_line(e: BaseException) -> str:
    """An OS error as 'PATH: reason' (Python's own form repeats the errno); anything else's first line, without
    the TensorStore spec dumps (kilobytes of JSON) that Orbax/TensorStore errors append."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    text = text.splitlines()[0].split(" [tensorstore_spec")[0] if text else type(e).__name__
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + "..."
