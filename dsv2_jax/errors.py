"""How a failure reads on one line (the CLI's `dsv2 CMD: error: ...` and warnings about skipped checkpoints)."""

from __future__ import annotations


def one_line(e: BaseException) -> str:
    """An OS error as 'PATH: reason' (Python's own form repeats the errno); anything else's first line."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
