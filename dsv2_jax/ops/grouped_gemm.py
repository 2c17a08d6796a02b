"""The grouped GEMM behind every routed-expert path: cost follows the activated experts, not the stored ones.

`grouped_expert_mlp(x, ids, w_gate, w_up, w_down, impl)` computes, for each row i, expert ids[i]'s SwiGLU
`down(silu(x_i W_gate) * x_i W_up)`. The single-device dropless path, both expert-parallel dispatch modes and
decode all call it; `impl` (config `grouped_gemm`) picks the backend, "auto" picks per platform and shape:

  * "gather"  — decode-sized batches (M ≤ E rows): gather only the selected experts' weights, batched mat-vecs.
                A B=1 step reads K/E of the expert bytes and skips the sort.
  * "tokamax" — tokamax's Pallas Mosaic `ragged_dot` (TPU v5+, NVIDIA Ampere+ / Hopper), forward and backward
                kernels; auto on TPU and on GPUs of compute capability ≥ 9.0. A shape/dtype the kernel rejects
                at trace time, or a shard_map with vma checks, falls back to "blocked".
  * "cpu"     — the XLA:CPU custom-call kernel of grouped_gemm_cpu.py (one register-blocked GEMM per expert,
                forward and backward); auto on CPU wherever a C++ compiler could build it.
  * "blocked" — the generic O(active) path (older GPUs; CPU without a compiler): rows sorted by expert, a loop
                over row tiles of `tile` rows (sized to the mean group size), each tile one expert's fused
                SwiGLU, with a custom VJP of the same shape: forward and backward cost ~(N·K + active_experts·tile)
                rows, not N·K·E; empty experts cost nothing but O(E) integers. Each expert's weight gradient is
                summed in fp32 over its tiles and stored in the weights' dtype into a zero buffer (no fp32
                [E, D, F] buffers).
  * "ragged_dot" — `jax.lax.ragged_dot` as XLA lowers it (dense-expands on CPU and, mostly, on GPU); kept as
                a comparison point.

Rows whose id is ≥ E (padding in the expert-parallel buffers) produce zeros in every backend.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dsv2_jax.config import GROUPED_GEMM_IMPLS
from dsv2_jax.ops import grouped_gemm_cpu
from dsv2_jax.ops.attention_backend import current_platform


def grouped_expert_mlp(x, ids, w_gate, w_up, w_down, rows=None, impl: str = "auto") -> jnp.ndarray:
    """x [R, D], ids [M] int, w_gate/w_up [E, D, F], w_down [E, F, D] → [M, D].

    Row i of the result is expert ids[i]'s SwiGLU of x[rows[i]] (rows [M] defaults to arange(M)); ids ≥ E
    give zero rows."""
    m, e = ids.shape[0], w_gate.shape[0]
    impl = select_impl(impl, m, e, w_gate.shape[1], w_gate.shape[2])
    if impl == "gather":
        return gathered_swiglu(x if rows is None else x[rows], ids, w_gate, w_up, w_down)
    order = jnp.argsort(ids, stable=True)
    group_sizes = jnp.bincount(ids, length=e).astype(jnp.int32)  # ids >= E sort last, uncounted
    xs = x[order if rows is None else rows[order]]
    ys = sorted_swiglu(xs, group_sizes, w_gate, w_up, w_down, impl)
    return jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)


def select_impl(impl: str, m: int, e: int, d: int, f: int) -> str:
    """Resolves "auto" for a problem of m rows over e experts of shape [d, f] on the platform being lowered for
    (attention_backend.current_platform)."""
    if impl not in GROUPED_GEMM_IMPLS:
        raise ValueError(f"grouped_gemm must be one of {GROUPED_GEMM_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if m <= e:  # fewer token copies than experts: reading only the selected experts' weights is cheapest
        return "gather"
    platform = current_platform()
    if platform == "tpu" and min(d, f) >= 128:  # the Mosaic TPU kernel's minimum dimensions
        return "tokamax"
    if platform == "gpu" and float(getattr(jax.devices()[0], "compute_capability", 0) or 0) >= 9.0:
        return "tokamax"
    if platform == "cpu" and grouped_gemm_cpu.available():
        return "cpu"
    return "blocked"


def sorted_swiglu(xs, group_sizes, w_gate, w_up, w_down, impl: str) -> jnp.ndarray:
    """xs [M, D] sorted by expert, group_sizes [E] (sum ≤ M; rows past the sum give zeros) → [M, D]."""
    if impl == "tokamax":
        if tokamax_accepts(xs, group_sizes, w_gate, w_up, w_down):
            return _swiglu_with(_tokamax_mosaic, xs, group_sizes, w_gate, w_up, w_down)
        impl = "blocked"  # a shape, dtype or device the kernels do not cover: stay O(active)
    if impl == "cpu":
        if current_platform() == "cpu" and grouped_gemm_cpu.available():
            # Inside shard_map the custom calls' results take their inputs' varying axes: give all one type.
            args = _unify_varying(xs, group_sizes, w_gate, w_up, w_down)
            return _swiglu_with(grouped_gemm_cpu.ragged_dot, *args)
        impl = "blocked"  # lowering for an accelerator, or no compiler here (available() warned)
    if impl == "blocked":
        xs, w_gate, w_up, w_down = _unify_varying(xs, w_gate, w_up, w_down)
        return blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, tile_rows(xs.shape[0], *w_gate.shape))
    if impl == "ragged_dot":
        return _swiglu_with(jax.lax.ragged_dot, xs, group_sizes, w_gate, w_up, w_down)
    raise ValueError(f"grouped_gemm {impl!r} does not run on sorted rows")


def tokamax_ragged_dot(lhs, rhs, group_sizes, **kw):
    """tokamax.ragged_dot (imported lazily: only accelerator paths and tests need the library)."""
    import tokamax
    return tokamax.ragged_dot(lhs, rhs, group_sizes, **kw)


def _tokamax_mosaic(lhs, rhs, group_sizes):
    return tokamax_ragged_dot(lhs, rhs, group_sizes, implementation="mosaic")


def tokamax_accepts(xs, group_sizes, w_gate, w_up, w_down) -> bool:
    """Whether tokamax's kernels take this problem forward AND backward: they refuse at trace time with
    NotImplementedError, and the backward's kernels (dX, dW) are only traced when differentiated, so both are
    traced abstractly here (no compute) before committing to them."""
    if any(map(_varying_axes, (xs, w_gate, w_up, w_down))):
        return False  # inside shard_map: tokamax's Pallas calls declare no varying mesh axes, which check_vma needs

    def fwd_bwd(xs, group_sizes, *w):
        ys, vjp = jax.vjp(lambda xs, *w: _swiglu_with(_tokamax_mosaic, xs, group_sizes, *w), xs, *w)
        return vjp(ys)
    try:
        jax.eval_shape(fwd_bwd, xs, group_sizes, w_gate, w_up, w_down)
    except NotImplementedError:
        return False
    return True


def _swiglu_with(ragged_dot, xs, group_sizes, w_gate, w_up, w_down):
    h = jax.nn.silu(ragged_dot(xs, w_gate, group_sizes)) * ragged_dot(xs, w_up, group_sizes)
    ys = ragged_dot(h, w_down, group_sizes)
    # Rows past sum(group_sizes) are unspecified in some kernels: zero them as the other backends do.
    valid = jnp.arange(xs.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], ys, 0).astype(xs.dtype)


# ---- gather: decode-sized batches ------------------------------------------------------------------------
def gathered_swiglu(x, ids, w_gate, w_up, w_down) -> jnp.ndarray:
    """x [M, D], ids [M] → [M, D]: batched mat-vecs against the M selected experts' weights only."""
    e = w_gate.shape[0]
    sel = jnp.minimum(ids, e - 1)
    h = (jax.nn.silu(jnp.einsum("md,mdf->mf", x, w_gate[sel])) * jnp.einsum("md,mdf->mf", x, w_up[sel]))
    y = jnp.einsum("mf,mfd->md", h, w_down[sel])
    return jnp.where((ids < e)[:, None], y, 0).astype(x.dtype)


# ---- blocked: tile loop with a matching backward ---------------------------------------------------------
def tile_rows(m: int, e: int, d: int, f: int) -> int:
    """Rows per tile (8..128), for M rows over E experts of shape [D, F]: the power of two that minimises, for
    a group of the mean size M / E, tiles × (rows per tile + a loop step's fixed cost in rows). Small tiles
    waste less padding (< one tile per active expert); each step costs about 2^16 multiply-adds of overhead
    plus a re-read of the expert's weights, worth 2^16 / (D·F) + 8 rows (fitted on CPU at D·F = 2k and 11k)."""
    mean = max(1.0, m / e)
    step = 8 + (1 << 16) / (d * f)
    return min((-(-mean // t) * (t + step), t) for t in (8, 16, 32, 64, 128))[1]


def _tile_table(group_sizes, m: int, tile: int):
    """Tiles cover each group in `tile`-row steps: per tile (expert, first row, group end), and the tile count.

    The table has a static length (an upper bound); only the first `count` entries are run."""
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    per_group = (group_sizes + tile - 1) // tile
    cum = jnp.cumsum(per_group)
    n_max = m // tile + min(e, m) + 1  # Σ ceil(n_e / tile) ≤ M / tile + (non-empty groups)
    t = jnp.arange(n_max)
    expert = jnp.minimum(jnp.searchsorted(cum, t, side="right", method="compare_all"), e - 1).astype(jnp.int32)
    start = ends[expert] - group_sizes[expert] + (t - (cum[expert] - per_group[expert])) * tile
    return expert, start.astype(jnp.int32), ends[expert].astype(jnp.int32), cum[-1]


def _tile_rows_valid(start, end, tile):
    return (start + jnp.arange(tile) < end)[:, None]


def _masked_store(buf, start, rows, valid):
    """Writes `rows` into buf at `start` where valid; rows past the group keep what is there (later tiles
    of the next group, processed afterwards, own them)."""
    old = jax.lax.dynamic_slice_in_dim(buf, start, rows.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(valid, rows.astype(buf.dtype), old), start, 0)


def _varying_axes(a) -> frozenset:
    """The shard_map mesh axes `a` varies over (empty outside shard_map); jax ≥ 0.12 names them `mat.varying`."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(getattr(t, "vma", None) or (mat.varying if mat is not None else ()))


def _unify_varying(*arrays):
    """Marks every array as varying over the union of their axes (a type change, no data movement), so the
    custom VJP sees one type; autodiff of the cast outside it adds the psums the cotangents need."""
    union = frozenset().union(*map(_varying_axes, arrays))
    cast = getattr(jax.lax, "pcast", None)
    out = []
    for a in arrays:
        missing = tuple(sorted(union - _varying_axes(a), key=str))
        if missing:
            a = cast(a, missing, to="varying") if cast else jax.lax.pvary(a, missing)
        out.append(a)
    return out


def _zeros(shape, dtype, like):
    """Zeros with `like`'s varying axes (loop carries inside shard_map must keep one type)."""
    z = jnp.zeros(shape, dtype)
    return _unify_varying(z, like)[0]


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, tile: int):
    """xs [M, D] sorted by expert, group_sizes [E] → [M, D], one expert's fused SwiGLU per `tile`-row tile."""
    return _blocked_fwd(xs, group_sizes, w_gate, w_up, w_down, tile)[0]


def _blocked_fwd(xs, group_sizes, w_gate, w_up, w_down, tile):
    m, d = xs.shape
    expert, start, end, count = _tile_table(group_sizes, m, tile)
    xp = jnp.pad(xs, ((0, tile), (0, 0)))  # a tile starting near the end must not be clamped back

    def body(i, y):
        ex, s = expert[i], start[i]
        xt = jax.lax.dynamic_slice_in_dim(xp, s, tile)
        h = jax.nn.silu(_dot(xt, w_gate[ex])) * _dot(xt, w_up[ex])
        return _masked_store(y, s, _dot(h.astype(xs.dtype), w_down[ex]), _tile_rows_valid(s, end[i], tile))

    y = jax.lax.fori_loop(0, count, body, _zeros((m + tile, d), xs.dtype, xs))
    return y[:m], (xs, group_sizes, w_gate, w_up, w_down)


def _blocked_bwd(tile, res, dy):
    """dX tile by tile; each expert's weight gradients summed in fp32 over its (consecutive) tiles in a [D, F]
    accumulator and stored, in the weights' dtype, into a zero buffer at that expert's row after each of its
    tiles: the last store holds the whole sum. No fp32 [E, D, F] buffer; empty experts keep their zeros."""
    xs, group_sizes, w_gate, w_up, w_down = res
    m, d = xs.shape
    expert, start, end, count = _tile_table(group_sizes, m, tile)
    xp = jnp.pad(xs, ((0, tile), (0, 0)))
    dyp = jnp.pad(dy.astype(xs.dtype), ((0, tile), (0, 0)))

    def body(i, carry):
        dx, dws, accs = carry
        ex, s = expert[i], start[i]
        valid = _tile_rows_valid(s, end[i], tile)
        # Rows past the group belong to another expert: zero them so they add nothing to this expert's grads.
        xt = jnp.where(valid, jax.lax.dynamic_slice_in_dim(xp, s, tile), 0)
        dyt = jnp.where(valid, jax.lax.dynamic_slice_in_dim(dyp, s, tile), 0)
        g, u = _dot(xt, w_gate[ex]), _dot(xt, w_up[ex])
        sig = jax.nn.sigmoid(g)
        h = (g * sig * u).astype(xs.dtype)
        dh = _dot(dyt, w_down[ex].T)
        du = (dh * g * sig).astype(xs.dtype)
        dg = (dh * u * sig * (1 + g * (1 - sig))).astype(xs.dtype)
        dxt = _dot(dg, w_gate[ex].T) + _dot(du, w_up[ex].T)
        first = jnp.logical_or(i == 0, expert[jnp.maximum(i - 1, 0)] != ex)  # the expert's first tile
        accs = tuple(jnp.where(first, 0, a) + part for a, part in zip(accs, (_dot(xt.T, dg), _dot(xt.T, du),
                                                                             _dot(h.T, dyt))))
        dws = tuple(jax.lax.dynamic_update_index_in_dim(w, a.astype(w.dtype), ex, 0) for w, a in zip(dws, accs))
        return _masked_store(dx, s, dxt, valid), dws, accs

    weights = (w_gate, w_up, w_down)
    init = (_zeros((m + tile, d), xs.dtype, xs), tuple(_zeros(w.shape, w.dtype, xs) for w in weights),
            tuple(_zeros(w.shape[1:], jnp.float32, xs) for w in weights))
    dx, (dwg, dwu, dwd), _ = jax.lax.fori_loop(0, count, body, init)
    return dx[:m], None, dwg, dwu, dwd


blocked_swiglu.defvjp(lambda xs, gs, wg, wu, wd, tile: _blocked_fwd(xs, gs, wg, wu, wd, tile), _blocked_bwd)
