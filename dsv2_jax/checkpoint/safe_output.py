"""Writing an output directory without ever losing data the tool did not write.

    with staged_output(out_dir, force, source, kind="convert", allowed=CONVERTED_NAMES) as tmp:
        ...write into tmp...

The output is built in a hidden temporary directory beside the target (`.NAME.XXXX.tmp`) that records its
writer (pid, host, process start time); it is renamed into place only when complete. The rules, in one place:

- the output is never the input and never contains it;
- an existing output is replaced only with `force`, and only if this tool wrote it: it holds the
  OUTPUT_MARKER file (or, for directories from before the marker, the recognisable layout of `kind`) and
  nothing but the names this tool writes there; an empty directory holds nothing to lose and may be replaced;
- temporary directories of the same output whose writer is gone (killed: SIGKILL, power loss) are removed on
  the next run; those of a live writer, or without our writer record, are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

OUTPUT_MARKER = ".dsv2-output.json"   # in every finished output directory: {"tool", "kind"}
WRITER_RECORD = ".dsv2-writer.json"  # in every temporary directory: who is writing it
TOOL = "dsv2-jax"


class OutputError(OSError):
    """An output path cannot be (re)placed safely; the message names it and says why."""


def _process_start(pid: int) -> str | None:
    """Kernel start time of a process (tells a live writer from a reused pid); None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the command name


def writer_record() -> dict:
    return {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def writer_alive(record: dict) -> bool:
    """Whether the process that wrote `record` may still be running (unknown hosts count as alive)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _process_start(pid)
    return start is None or record.get("start") in (None, start)


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("tool") == TOOL else None


def remove_stale_temps(out: Path) -> list[Path]:
    """Removes `.NAME.*.tmp` directories beside `out` that this tool made and whose writer is gone."""
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        rec = _read_record(tmp / WRITER_RECORD) if tmp.is_dir() and not tmp.is_symlink() else None
        if rec is not None and not writer_alive(rec):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_replaceable(out: Path, kind: str, allowed: Callable[[str], bool], layout: Callable[[Path], bool]) -> None:
    """Raises OutputError unless `out` (which exists) is a directory this tool wrote as `kind` output."""
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory written by dsv2; not replacing it")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    marker = _read_record(out / OUTPUT_MARKER)
    if marker is None and not layout(out):
        raise OutputError(f"{out}: not a directory written by `dsv2 {kind}` (no {OUTPUT_MARKER}); "
                          "not replacing it: choose another output or remove it yourself")
    if marker is not None and marker.get("kind") != kind:
        raise OutputError(f"{out}: written by `dsv2 {marker.get('kind')}`, not `dsv2 {kind}`; not replacing it")
    foreign = [n for n in names if n != OUTPUT_MARKER and not allowed(n)]
    if foreign:
        raise OutputError(f"{out}: holds {foreign[:3]}{' ...' if len(foreign) > 3 else ''}, which dsv2 {kind} "
                          "did not write; not replacing it")


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, force: bool, source: str | os.PathLike, *, kind: str,
                  allowed: Callable[[str], bool], layout: Callable[[Path], bool]) -> Iterator[Path]:
    """A fresh temporary directory beside `out_dir`, renamed to it on success and removed on any failure.

    `allowed(name)`: whether this tool writes top-level entry `name` in a `kind` output; `layout(dir)`: whether
    an unmarked directory has the recognisable layout of one (outputs written before the marker existed).
    """
    out = Path(os.path.abspath(out_dir))
    src = Path(source).resolve()
    real = out.resolve()
    if real == src:
        raise OutputError(f"{out}: output directory is the input directory")
    if _inside(src, real):
        raise OutputError(f"{out}: output directory contains the input {src}; not replacing it")
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"{out}: already exists (pass --force to replace it)")
        check_replaceable(out, kind, allowed, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / WRITER_RECORD).write_text(json.dumps(writer_record()))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other directory
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"tool": TOOL, "kind": kind}))
        (tmp / WRITER_RECORD).unlink()
        if out.exists():
            # Move the old output aside (as a temp of ours, so a crash here is cleaned up by the next run), then
            # swap: at no moment is neither the old nor the new output on disk.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            os.replace(out, old / "old")
            (old / WRITER_RECORD).write_text(json.dumps(writer_record()))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
