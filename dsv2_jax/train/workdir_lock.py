"""One `dsv2 train` per workdir: an advisory lock (flock) on WORKDIR/.dsv2-train.lock.

The kernel drops the lock when its holder exits or dies, so a crashed run never blocks the next one; the file
only records who holds it (pid, host, start time) for the refusal message. flock locks belong to an open file,
so a second run in the same process is refused too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".dsv2-train.lock"


class WorkdirLocked(OSError):
    """Another process is training in this workdir; the message names it."""


class WorkdirLock:
    """Held from construction until `release()` (or process exit)."""

    def __init__(self, workdir: str | Path):
        self.path, self._fd = Path(workdir) / LOCK_FILE, None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirLocked(f"{self.path.parent}: in use by another dsv2 train ({self._holder()}); wait for it "
                                "to finish or stop it, or use another --workdir") from None
        except OSError:  # a filesystem without flock (some network mounts): run unguarded rather than not at all
            os.close(fd)
            return
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)

    def _holder(self) -> str:
        try:
            rec = json.loads(self.path.read_text())
            return f"pid {rec['pid']} on {rec['host']} since {rec['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.release()
