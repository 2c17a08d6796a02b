"""Synthetic packed batches for training tests (the layout of dsv2_jax.train.data), as a checkpointable grain dataset."""

from __future__ import annotations

import time

import grain
import numpy as np

from dsv2_jax.train.config import TrainConfig

# A small 2-layer (1 dense + 1 MoE) model keeps compile time low; routing is group-limited over 4 groups.
TEST_MODEL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8)


def make_test_config(**kw) -> TrainConfig:
    base = dict(model="tiny", model_overrides=TEST_MODEL, seq_len=16, global_batch=8, steps=8, lr=3e-3,
                warmup_steps=2, compute_dtype="float32", checkpoint_every=4, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def make_batch(index: int, batch: int, seq_len: int, vocab: int = 259) -> dict[str, np.ndarray]:
    """Two packed documents per row (segment ids 1, 2), padding at the end of some rows."""
    rng = np.random.default_rng(index)
    inputs = rng.integers(0, vocab, (batch, seq_len)).astype(np.int32)
    seg = np.ones((batch, seq_len), np.int32)
    seg[:, seq_len // 2:] = 2
    seg[::3, -3:] = 0
    pos = np.where(seg == 1, np.arange(seq_len), np.arange(seq_len) - seq_len // 2).astype(np.int32)
    same = np.zeros_like(seg, bool)
    same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    targets = np.where(same, np.roll(inputs, -1, 1), 0).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos,
            "loss_mask": same.astype(np.float32)}


def synthetic_dataset(batch: int, seq_len: int, length: int = 1000, stall_at: int | None = None):
    """Batches 0, 1, ...; fetching batch `stall_at` blocks forever (to kill a run at a known point)."""
    def get(i):
        if stall_at is not None and i >= stall_at:
            time.sleep(3600)
        return make_batch(int(i), batch, seq_len)
    return grain.MapDataset.range(length).map(get).to_iter_dataset()
