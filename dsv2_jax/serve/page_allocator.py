"""Host-side page bookkeeping: a free list, reference counts, and automatic prefix caching.

A full page is identified by a hash chained over every token up to its end (sha256 of the previous page's digest
and this page's tokens), so equal hashes mean equal prefixes. When a page fills it is registered under its hash;
a new request whose prompt starts with registered pages shares them (refcount + 1) and computes only the rest.
A page whose refcount drops to zero but that holds a registered prefix is kept, evictable in LRU order, until the
free list runs dry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from dsv2_jax.serve.paged_cache import TRASH_PAGE


def page_hashes(tokens: list[int], page_size: int, start: int = 0, prev: bytes = b"") -> list[bytes]:
    """Chained digests of the full pages of `tokens` from page `start` on (`prev`: digest of page start-1)."""
    out = []
    for i in range(start, len(tokens) // page_size):
        prev = hashlib.sha256(prev + np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()).digest()
        out.append(prev)
    return out


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free = deque(p for p in range(num_pages) if p != TRASH_PAGE)
        self.refs = np.zeros(num_pages, np.int64)
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, still holding a cached prefix

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the trash page)."""
        return self.num_pages - 1

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_in_use(self) -> int:
        return int((self.refs > 0).sum())

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (refcount 1), evicting cached prefixes LRU-first if needed; None if fewer are available."""
        if n > self.num_available:
            return None
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            assert self.refs[page] >= 0, f"page {page} released twice"
            if self.refs[page] == 0:
                if page in self.hash_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Pages holding the longest registered prefix of `hashes`, each with its refcount raised."""
        pages = []
        for h in hashes:
            page = self.by_hash.get(h)
            if page is None:
                break
            self.evictable.pop(page, None)
            self.refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, h: bytes) -> None:
        """Marks a full, in-use page as holding the prefix with digest h (first writer wins)."""
        if h not in self.by_hash and page not in self.hash_of:
            self.by_hash[h] = page
            self.hash_of[page] = h
