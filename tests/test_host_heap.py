"""CPU training keeps freed host memory mapped: XLA:CPU's per-step temp buffer (tens of MB) must not page-fault
back in at every step (issue #10: ~10k minor faults a step made the 64-expert tiny train step ~1.6× the 4-expert
one)."""

import platform
import resource

import numpy as np
import pytest

from dsv2_jax.train import host_heap, state
from dsv2_jax.train.config import TrainConfig
from dsv2_jax.parallel.sharding import make_mesh


def _faults_per_block(blocks: int = 4, mb: int = 40) -> list[int]:
    """Minor page faults while allocating, touching and freeing a `mb` MB block, `blocks` times."""
    out = []
    for _ in range(blocks):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(mb << 18, np.float32)
        a.sum()
        del a
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_large_blocks_come_back_without_page_faults():
    assert host_heap.keep_freed_heap()
    first, *again = _faults_per_block()
    assert max(again) * 10 < max(first, 100), (first, again)  # the same pages again: (almost) no faults


def test_cpu_trainer_keeps_freed_heap_and_the_env_opts_out(monkeypatch):
    calls = []
    monkeypatch.setattr(state, "keep_freed_heap", lambda: calls.append(1))
    state.Trainer(TrainConfig.load("tiny"), make_mesh(TrainConfig.load("tiny").mesh))
    assert calls == [1]
    monkeypatch.setenv("DSV2_KEEP_FREED_HEAP", "0")
    assert host_heap.keep_freed_heap() is False
