"""The host arrays of one scheduler step, from block tables kept between steps.

Every request that holds pages owns a slot: a row of one persistent [slots, max_pages] int32 block table (unused
entries are the trash page), written when it gets pages and cleared when it frees them. A step's block tables are
then one fancy index by its token rows' slots, and its other arrays come from one pass over its rows, instead of
a table rebuilt and numpy slices written per row every step: the scheduler's host work runs while the device
computes the previous step, and on a CPU host it shares the cores with it.

Each step's arrays are fresh numpy arrays (a few hundred bytes): a buffer reused across steps could still be read
by a dispatched call that has not run yet, on a backend that copies its inputs asynchronously.
"""

from __future__ import annotations

import numpy as np

from dsv2_jax.serve.paged_cache import TRASH_PAGE
from dsv2_jax.serve.request import Request

PENDING = -1  # a sampled token still on the device (its slot in Request.tokens until the call is read back)


class BlockTables:
    """table [S + 1, max_pages] int32: slot s's page ids (the trash page past its last page); the last row is
    all trash pages, the table of padding rows. A request takes a slot with its first page (`extend`) and gives
    it back in `clear`; the slot count doubles when every slot is taken."""

    def __init__(self, slots: int, max_pages: int):
        self.table = np.full((slots + 1, max_pages), TRASH_PAGE, np.int32)
        self.free = list(range(slots - 1, -1, -1))

    @property
    def padding(self) -> int:
        return len(self.table) - 1

    def extend(self, req: Request, pages: list[int]) -> None:
        """Appends `pages` to req's table (req.pages must already end with them)."""
        if not pages:
            return
        if req.slot < 0:
            if not self.free:
                n = self.padding
                self.table = np.concatenate([self.table, np.full_like(self.table[:n], TRASH_PAGE)])
                self.free = list(range(2 * n - 1, n - 1, -1))
            req.slot = self.free.pop()
        end = len(req.pages)
        self.table[req.slot, end - len(pages):end] = pages

    def clear(self, req: Request) -> None:
        if req.slot >= 0:
            self.table[req.slot] = TRASH_PAGE
            self.free.append(req.slot)
            req.slot = -1


def step_arrays(rows: list[tuple[Request, int]], tables: BlockTables, prev_slots: dict[int, tuple], n_rows: int,
                width: int, batch_cap: int):
    """rows [(request, n tokens)] → the jitted step's host arrays (paged_step.py): packed [4, n_rows] (tokens,
    positions, valid, source row in the previous call's output or -1), block_tables [n_rows, width], knobs
    [4, batch_cap] (sample row, seed, step, top_k), probs [2, batch_cap] (temperature, top_p). A row's n tokens
    are n consecutive token rows from its request's first uncomputed one; only a request's last token can be
    PENDING (a decode row): it is read on the device from row prev_slots[id(request)][0] of the previous call's
    output. One pass over the rows in Python, then one numpy call per array: a step holds tens of rows, where
    numpy's per-call cost exceeds its per-element one."""
    tokens, positions, slots, sources = [], [], [], [-1] * n_rows
    knobs = [[0] * batch_cap for _ in range(4)]
    probs = [[0.0] * batch_cap, [1.0] * batch_cap]
    for j, (r, n) in enumerate(rows):
        start = r.num_cached
        tokens += r.tokens[start:start + n]
        positions += range(start, start + n)
        slots += [r.slot] * n
        if tokens[-1] == PENDING:  # a decode row: its input is the previous call's output
            tokens[-1], sources[len(tokens) - 1] = 0, prev_slots[id(r)][0]
        p = r.params
        knobs[0][j], knobs[1][j] = len(tokens) - 1, p.seed
        knobs[2][j], knobs[3][j] = len(r.tokens) - len(r.prompt), p.top_k
        probs[0][j], probs[1][j] = p.temperature, p.top_p
    pad = n_rows - len(tokens)
    valid = [1] * len(tokens) + [0] * pad
    packed = np.array([tokens + [0] * pad, positions + [0] * pad, valid, sources], np.int32)
    block_tables = tables.table[slots + [tables.padding] * pad, :width]
    return packed, block_tables, np.array(knobs, np.int32), np.array(probs, np.float32)
