"""Expert parallelism (DeepSeek-V2 §3.2.2): routed experts split over the mesh's expert axis.

Inside `jax.shard_map`, every device routes its own tokens, sends each (token, expert) copy to the device
owning that expert, runs its local experts through the grouped GEMM (`grouped_gemm.grouped_expert_mlp`, the
same seam as the single-device path), and sends the results back, where they are combined with the gate
weights. The expert-MLP width may additionally be split (partial sums are reduced once, after the combine).
Every axis name and shard_map spec comes from `sharding.LOGICAL_RULES`, through the experts' logical axes
(`moe.EXPERT_IN_AXES` / `EXPERT_OUT_AXES`) and `sharding.batch_spec`.

`use_mesh(model, mesh, ...)` attaches the dispatch to every MoE layer of a model (a static attribute, so it
rides in the graphdef): the trainer does it for training and eval, `load_model(path, mesh=mesh)` for decode
and serving. `dispatch_for` is the one place the choice is made from config + mesh.

Dispatch modes:
  * "capacity" — the paper's device-level token dropping: each device sends at most
    ceil(capacity_factor · n·K / ep) copies to every other device; over budget, the lowest-affinity copies
    (smallest s_{i,t}) are dropped, except that every `never_drop_every`-th sequence ranks first (the paper
    keeps ~10% of sequences whole). Fixed-size `all_to_all`. Only while training: eval never drops.
  * "dropless" — nothing dropped. Off CPU `jax.lax.ragged_all_to_all` moves exactly the routed copies;
    on CPU (where it does not run) the same fixed-size `all_to_all` is used with worst-case padding.
Device-limited routing (each token touches at most topk_group devices) needs the router's groups to line up
with the expert shards: n_group must be a multiple of the expert-axis size (`check_expert_mesh`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dsv2_jax.config import ModelConfig
from dsv2_jax.model.moe import EXPERT_IMPLS, EXPERT_IN_AXES, EXPERT_OUT_AXES, MoE, Routing
from dsv2_jax.ops.attention_backend import current_platform
from dsv2_jax.ops.grouped_gemm import grouped_expert_mlp
from dsv2_jax.parallel.sharding import EXPERTS, LOGICAL_RULES, batch_divisor, batch_spec, compute_spec

DISPATCH_MODES = ("dropless", "capacity")
EXPERT_MESH_AXIS = LOGICAL_RULES[EXPERTS]


def expert_axis_size(mesh) -> int:
    return mesh.shape.get(EXPERT_MESH_AXIS, 1)


def check_expert_mesh(cfg: ModelConfig, mesh: Mesh) -> None:
    ep = expert_axis_size(mesh)
    if cfg.num_moe_layers == 0 or ep == 1:
        return
    if cfg.n_routed_experts % ep:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the expert axis ({ep})")
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group % ep:
        raise ValueError(f"device-limited routing needs n_group ({cfg.n_group}) to be a multiple of the expert "
                         f"axis ({ep}) so every router group lives on one device")


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def _dispatch_fixed(x, experts, affinity, w_gate, w_up, w_down, ep, capacity, gemm, axis):
    """all_to_all over mesh axis `axis` with `capacity` slots per (source, destination) pair; over capacity,
    lowest affinity drops. Returns ([n*K, D] expert outputs per copy, [n*K] kept mask)."""
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
    a2a = partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0)
    recv_x = a2a(send_x.reshape(ep, capacity, -1)).reshape(ep * capacity, -1)
    recv_id = a2a(send_id.reshape(ep, capacity)).reshape(-1)
    out = grouped_expert_mlp(recv_x, recv_id, w_gate, w_up, w_down, impl=gemm)
    back = a2a(out.reshape(ep, capacity, -1)).reshape(ep * capacity, -1)
    return back[jnp.minimum(slot, ep * capacity - 1)], keep


def _dispatch_ragged(x, experts, w_gate, w_up, w_down, ep, gemm, axis):
    """Dropless with jax.lax.ragged_all_to_all: only the routed copies cross the network (GPU/TPU)."""
    n, k = experts.shape
    e_local = w_gate.shape[0]
    flat_e = experts.reshape(-1)
    dest = flat_e // e_local
    order = jnp.argsort(dest, stable=True)
    send_sizes = jnp.bincount(dest, length=ep).astype(jnp.int32)
    sizes = jax.lax.all_gather(send_sizes, axis)  # sizes[i, j]: copies device i sends to device j
    me = jax.lax.axis_index(axis)
    in_offsets = _exclusive_cumsum(send_sizes)
    out_offsets = _exclusive_cumsum(sizes, axis=0)[me]   # where my chunk lands in each receiver's buffer
    recv_sizes = sizes[:, me]
    recv_offsets = _exclusive_cumsum(recv_sizes)
    return_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]  # where each sender keeps the copies it sent me
    buffer = ep * n * min(k, e_local)  # worst case: every device sends all its copies here
    send_x = x[(order // k)]
    recv_x = jax.lax.ragged_all_to_all(send_x, jnp.zeros((buffer, x.shape[1]), x.dtype), in_offsets, send_sizes,
                                       out_offsets, recv_sizes, axis_name=axis)
    recv_id = jax.lax.ragged_all_to_all((flat_e % e_local)[order].astype(jnp.int32),
                                        jnp.full((buffer,), e_local, jnp.int32), in_offsets, send_sizes,
                                        out_offsets, recv_sizes, axis_name=axis)
    out = grouped_expert_mlp(recv_x, recv_id, w_gate, w_up, w_down, impl=gemm)
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((n * k, x.shape[1]), out.dtype), recv_offsets, recv_sizes,
                                     return_offsets, send_sizes, axis_name=axis)
    return jnp.zeros_like(back).at[order].set(back)


@dataclass(frozen=True)
class ExpertParallel:
    """`dispatch(x [N, D], routing, w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D], gemm="auto") -> [N, D]`
    running the routed experts expert-parallel over `mesh`; `gemm` is the local experts' grouped-GEMM backend
    (the model passes config `grouped_gemm`). Hashable: it is a static attribute of the MoE modules.

    `ragged_all_to_all` (whenever nothing drops): move exactly the routed copies (GPU/TPU; `dispatch_for`
    decides). Capacity mode drops only with `train`; with `seq_len` (x's rows are whole sequences of that length) and
    `never_drop_every` = n > 0, every n-th sequence of each shard is never dropped — the paper keeps ~10% of
    sequences whole (n = 10); data order is shuffled, so which sequences those are is random."""
    mesh: Mesh
    mode: str = "dropless"
    capacity_factor: float = 1.0
    train: bool = True
    ragged_all_to_all: bool = False
    seq_len: int | None = None
    never_drop_every: int = 0

    def __post_init__(self):
        if self.mode not in DISPATCH_MODES:
            raise ValueError(f"moe dispatch mode must be one of {DISPATCH_MODES}, got {self.mode!r}")

    def __call__(self, x, r: Routing, w_gate, w_up, w_down, gemm: str = "auto"):
        ep = expert_axis_size(self.mesh)
        if w_gate.shape[0] % ep:
            raise ValueError(f"{w_gate.shape[0]} experts cannot be split over an expert axis of size {ep}")
        in_spec, out_spec = (compute_spec(a, w.shape, self.mesh) for a, w in ((EXPERT_IN_AXES, w_gate),
                                                                           (EXPERT_OUT_AXES, w_down)))
        tok = batch_spec(self.mesh)
        n = x.shape[0]
        pad = -n % batch_divisor(self.mesh)  # decode batches need not divide the batch axes: pad rows, zero gates
        rows = partial(jnp.pad, pad_width=((0, pad), (0, 0))) if pad else (lambda a: a)
        affinity = jnp.take_along_axis(r.scores, r.experts, axis=1)
        # check_vma=False: tokamax's Pallas kernels declare no varying mesh axes, so under the check they cannot
        # run here (the attention shard_map does the same). Values and gradients equal single-device with every
        # grouped-GEMM backend (tests/test_expert_parallel.py).
        fn = jax.shard_map(partial(self._local, ep=ep, split_f=in_spec[2], gemm=gemm), mesh=self.mesh,
                           in_specs=(tok, tok, tok, tok, in_spec, in_spec, out_spec), out_specs=tok, check_vma=False)
        y = fn(rows(x), rows(r.experts), rows(r.weights), rows(affinity), w_gate, w_up, w_down)
        return y[:n]

    def _local(self, x, experts, weights, affinity, w_gate, w_up, w_down, ep: int, split_f, gemm: str):
        """One device's share: x [n, D] local tokens, experts / weights / affinity [n, K] → [n, D]."""
        n, k = experts.shape
        e_local = w_gate.shape[0]
        if self.mode == "capacity" and self.train:
            cap = max(1, math.ceil(self.capacity_factor * n * k / ep))
            if self.never_drop_every and self.seq_len:
                # Affinities are softmax probabilities (<= 1): +2 ranks protected copies first.
                protected = (jnp.arange(n) // self.seq_len) % self.never_drop_every == 0
                affinity = affinity + 2.0 * protected[:, None]
            y, keep = _dispatch_fixed(x, experts, affinity, w_gate, w_up, w_down, ep, cap, gemm, EXPERT_MESH_AXIS)
            weights = jnp.where(keep.reshape(n, k), weights, 0.0)
        elif self.ragged_all_to_all:
            y = _dispatch_ragged(x, experts, w_gate, w_up, w_down, ep, gemm, EXPERT_MESH_AXIS)
        else:
            y, _ = _dispatch_fixed(x, experts, affinity, w_gate, w_up, w_down, ep, n * min(k, e_local), gemm,
                                   EXPERT_MESH_AXIS)
        out = jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1).astype(jnp.float32), weights)
        if split_f is not None:  # each rank holds a slice of the expert width: sum the partial outputs
            out = jax.lax.psum(out, split_f)
        return out.astype(x.dtype)


def dispatch_for(cfg: ModelConfig, mesh=None, *, mode: str = "dropless", capacity_factor: float = 1.0,
                 train: bool = False, seq_len: int | None = None, never_drop_every: int = 0):
    """How the routed experts of `cfg` run on `mesh` (a Mesh or AbstractMesh): without a mesh of several devices
    that has the expert axis, this device's `moe.EXPERT_IMPLS[cfg.moe_impl]`; else `ExpertParallel`, with
    ragged_all_to_all wherever the mesh's devices are not CPUs (an AbstractMesh may name its device)."""
    if mesh is None or mesh.size == 1 or EXPERT_MESH_AXIS not in mesh.axis_names:
        return EXPERT_IMPLS[cfg.moe_impl]
    check_expert_mesh(cfg, mesh)
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
    with jax.sharding.use_abstract_mesh(abstract):
        ragged = current_platform() != "cpu"
    return ExpertParallel(mesh, mode, capacity_factor, train, ragged, seq_len, never_drop_every)


def use_dispatch(model: nnx.Module, dispatch) -> nnx.Module:
    """Sets `dispatch` on every MoE layer of `model` (in place) and returns the model."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoE):
            node.dispatch = dispatch
    return model


def use_mesh(model: nnx.Module, mesh=None, **dispatch_args) -> nnx.Module:
    """Attaches `dispatch_for(model.config, mesh, **dispatch_args)` to every MoE layer of `model` (e.g. one
    built by `abstract_model` and restored); returns the model. No mesh: back to the single-device experts."""
    return use_dispatch(model, dispatch_for(model.config, mesh, **dispatch_args))
