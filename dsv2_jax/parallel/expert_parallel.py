"""Expert parallelism (DeepSeek-V2 §3.2.2): routed experts split over the mesh's "expert" axis.

Inside `jax.shard_map`, every device routes its own tokens, sends each (token, expert) copy to the device
owning that expert, runs its local experts through the grouped GEMM (`grouped_gemm.grouped_expert_mlp`, the
same seam as the single-device path), and sends the results back, where they are combined with the gate weights. The expert-MLP width may additionally be split over "tensor" (partial sums
are reduced once, after the combine). Plugged into the model through MoE's `experts_fn` hook.

Dispatch modes:
  * "capacity" — the paper's device-level token dropping: each device sends at most
    ceil(capacity_factor · n·K / ep) copies to every other device; over budget, the lowest-affinity copies
    (smallest s_{i,t}) are dropped, except that every `never_drop_every`-th sequence ranks first (the paper
    keeps ~10% of sequences whole). Fixed-size `all_to_all`. Only while training: eval never drops.
  * "dropless" — nothing dropped. On GPU/TPU `jax.lax.ragged_all_to_all` moves exactly the routed copies;
    on CPU (where it does not run) the same fixed-size `all_to_all` is used with worst-case padding.
Device-limited routing (each token touches at most topk_group devices) needs the router's groups to line up
with the expert shards: n_group must be a multiple of the expert-axis size (`check_expert_mesh`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsv2_jax.config import ModelConfig
from dsv2_jax.ops.grouped_gemm import grouped_expert_mlp
from dsv2_jax.model.moe import Routing
from dsv2_jax.parallel.sharding import BATCH_AXES

DISPATCH_MODES = ("dropless", "capacity")


def check_expert_mesh(cfg: ModelConfig, mesh: Mesh) -> None:
    ep = mesh.shape["expert"]
    if cfg.num_moe_layers == 0 or ep == 1:
        return
    if cfg.n_routed_experts % ep:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the expert axis ({ep})")
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group % ep:
        raise ValueError(f"device-limited routing needs n_group ({cfg.n_group}) to be a multiple of the expert "
                         f"axis ({ep}) so every router group lives on one device")


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def _dispatch_fixed(x, experts, affinity, w_gate, w_up, w_down, ep, capacity, gemm):
    """all_to_all with `capacity` slots per (source, destination) pair; over capacity, lowest affinity drops.
    Returns ([n*K, D] expert outputs per copy, [n*K] kept mask)."""
    n, k = experts.shape
    e_local = w_gate.shape[0]
    flat_e = experts.reshape(-1)
    dest = flat_e // e_local
    # Rank every copy within its destination by descending affinity: the rank decides who fits.
    order = jnp.lexsort((-affinity.reshape(-1), dest))
    sorted_dest = dest[order]
    starts = _exclusive_cumsum(jnp.bincount(dest, length=ep))
    rank = jnp.zeros_like(dest).at[order].set(jnp.arange(n * k) - starts[sorted_dest])
    keep = rank < capacity
    slot = jnp.where(keep, dest * capacity + rank, ep * capacity)  # out-of-range → dropped by the scatter
    send_x = jnp.zeros((ep * capacity, x.shape[1]), x.dtype).at[slot].set(x[jnp.arange(n * k) // k], mode="drop")
    send_id = jnp.full((ep * capacity,), e_local, jnp.int32).at[slot].set(flat_e % e_local, mode="drop")
    a2a = partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0)
    recv_x = a2a(send_x.reshape(ep, capacity, -1)).reshape(ep * capacity, -1)
    recv_id = a2a(send_id.reshape(ep, capacity)).reshape(-1)
    out = grouped_expert_mlp(recv_x, recv_id, w_gate, w_up, w_down, impl=gemm)
    back = a2a(out.reshape(ep, capacity, -1)).reshape(ep * capacity, -1)
    return back[jnp.minimum(slot, ep * capacity - 1)], keep


def _dispatch_ragged(x, experts, w_gate, w_up, w_down, ep, gemm):
    """Dropless with jax.lax.ragged_all_to_all: only the routed copies cross the network (GPU/TPU)."""
    n, k = experts.shape
    e_local = w_gate.shape[0]
    flat_e = experts.reshape(-1)
    dest = flat_e // e_local
    order = jnp.argsort(dest, stable=True)
    send_sizes = jnp.bincount(dest, length=ep).astype(jnp.int32)
    sizes = jax.lax.all_gather(send_sizes, "expert")  # sizes[i, j]: copies device i sends to device j
    me = jax.lax.axis_index("expert")
    in_offsets = _exclusive_cumsum(send_sizes)
    out_offsets = _exclusive_cumsum(sizes, axis=0)[me]   # where my chunk lands in each receiver's buffer
    recv_sizes = sizes[:, me]
    recv_offsets = _exclusive_cumsum(recv_sizes)
    return_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]  # where each sender keeps the copies it sent me
    buffer = ep * n * min(k, e_local)  # worst case: every device sends all its copies here
    send_x = x[(order // k)]
    recv_x = jax.lax.ragged_all_to_all(send_x, jnp.zeros((buffer, x.shape[1]), x.dtype), in_offsets, send_sizes,
                                       out_offsets, recv_sizes, axis_name="expert")
    recv_id = jax.lax.ragged_all_to_all((flat_e % e_local)[order].astype(jnp.int32),
                                        jnp.full((buffer,), e_local, jnp.int32), in_offsets, send_sizes,
                                        out_offsets, recv_sizes, axis_name="expert")
    out = grouped_expert_mlp(recv_x, recv_id, w_gate, w_up, w_down, impl=gemm)
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((n * k, x.shape[1]), out.dtype), recv_offsets, recv_sizes,
                                     return_offsets, send_sizes, axis_name="expert")
    return jnp.zeros_like(back).at[order].set(back)


def make_experts_fn(mesh: Mesh, mode: str = "dropless", capacity_factor: float = 1.0, train: bool = True,
                    use_ragged_all_to_all: bool | None = None, seq_len: int | None = None,
                    never_drop_every: int = 0):
    """An `experts_fn(x[N,D], routing, w_gate, w_up, w_down, gemm="auto") -> [N,D]` running the experts
    expert-parallel; `gemm` is the local experts' grouped-GEMM backend (the model passes config `grouped_gemm`).

    use_ragged_all_to_all defaults to True off CPU (dropless mode only). Capacity mode: with `seq_len` (x's rows
    are whole sequences of that length) and `never_drop_every` = n > 0, every n-th sequence of each shard is
    never dropped — the paper keeps ~10% of sequences whole (n = 10); data order is shuffled, so which
    sequences those are is random."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"moe dispatch mode must be one of {DISPATCH_MODES}, got {mode!r}")
    if use_ragged_all_to_all is None:
        use_ragged_all_to_all = jax.default_backend() != "cpu"
    ep = mesh.shape["expert"]
    drop = mode == "capacity" and train

    def local(x, experts, weights, affinity, w_gate, w_up, w_down, split_f: bool, gemm: str):
        n, k = experts.shape
        e_local = w_gate.shape[0]
        if drop:
            cap = max(1, math.ceil(capacity_factor * n * k / ep))
            if never_drop_every and seq_len:
                # Affinities are softmax probabilities (<= 1): +2 ranks protected copies first.
                protected = (jnp.arange(n) // seq_len) % never_drop_every == 0
                affinity = affinity + 2.0 * protected[:, None]
            y, keep = _dispatch_fixed(x, experts, affinity, w_gate, w_up, w_down, ep, cap, gemm)
            weights = jnp.where(keep.reshape(n, k), weights, 0.0)
        elif use_ragged_all_to_all:
            y = _dispatch_ragged(x, experts, w_gate, w_up, w_down, ep, gemm)
        else:
            y, _ = _dispatch_fixed(x, experts, affinity, w_gate, w_up, w_down, ep, n * min(k, e_local), gemm)
        out = jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1).astype(jnp.float32), weights)
        if split_f:  # each tensor rank holds a slice of the expert width: sum the partial outputs
            out = jax.lax.psum(out, "tensor")
        return out.astype(x.dtype)

    def experts_fn(x, r: Routing, w_gate, w_up, w_down, gemm: str = "auto"):
        e, _, f = w_gate.shape
        if e % ep:
            raise ValueError(f"{e} experts cannot be split over an expert axis of size {ep}")
        ff = "tensor" if f % mesh.shape["tensor"] == 0 else None
        tok = P(BATCH_AXES)
        affinity = jnp.take_along_axis(r.scores, r.experts, axis=1)
        fn = jax.shard_map(partial(local, split_f=ff is not None, gemm=gemm), mesh=mesh, out_specs=tok,
                           in_specs=(tok, tok, tok, tok, P("expert", None, ff), P("expert", None, ff),
                                     P("expert", ff, None)))
        return fn(x, r.experts, r.weights, affinity, w_gate, w_up, w_down)

    return experts_fn
