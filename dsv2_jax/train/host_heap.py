"""Keeps freed host memory in the process heap on CPU training runs, so each step reuses already-mapped pages.

XLA:CPU allocates an executable's temp buffer afresh at every execution (one block: 37 MB for the tiny preset's
train step with 64 experts, 30 MB with 4) and frees it afterwards. glibc serves a block above its mmap threshold
(dynamic, at most 32 MB) with a fresh mmap and unmaps it on free, so every step page-faults the whole block back
in: ~10k minor faults a step at 64 experts (at 4 too once other allocations have moved the threshold), which
alone made the 64-expert train step ~1.6× the 4-expert one (docs/benchmarks.md, issue #10). M_MMAP_MAX = 0
serves large blocks from the heap and a high M_TRIM_THRESHOLD keeps the freed top of the heap mapped, so the next
step gets the same pages back. The cost: the process keeps its peak heap instead of returning it. Set
DSV2_KEEP_FREED_HEAP=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_TRIM_THRESHOLD = 1 << 30


def keep_freed_heap() -> bool:
    """Tells glibc's malloc to serve large blocks from the heap and keep freed memory; True if it did (no-op and
    False off glibc, or with DSV2_KEEP_FREED_HEAP=0)."""
    if os.environ.get("DSV2_KEEP_FREED_HEAP", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
