"""The grouped GEMM behind every routed-expert path: cost follows the activated experts, not the stored ones.

`grouped_expert_mlp(x, ids, w_gate, w_up, w_down, impl)` computes, for each row i, expert ids[i]'s SwiGLU
`down(silu(x_i W_gate) * x_i W_up)`. The single-device dropless path, both expert-parallel dispatch modes and
decode all call it; `impl` (config `grouped_gemm`) picks the backend, "auto" picks per platform and shape:

  * "gather"  — decode-sized batches (M ≤ E rows): gather only the selected experts' weights, batched mat-vecs.
                A B=1 step reads K/E of the expert bytes and skips the sort.
  * "tokamax" — tokamax's Pallas Mosaic `ragged_dot` (TPU v5+, NVIDIA Ampere+ / Hopper), forward and backward
                kernels; auto on TPU and on GPUs of compute capability ≥ 9.0. A shape/dtype the kernel rejects
                at trace time falls back to "blocked".
  * "blocked" — the generic O(active) path (CPU, older GPUs): rows sorted by expert, a loop over row tiles
                of `tile` rows, each tile one expert's fused SwiGLU, with a custom VJP of the same shape, so
                forward and backward cost ~(N·K + active_experts·tile) rows, not N·K·E.
  * "ragged_dot" — `jax.lax.ragged_dot` as XLA lowers it (dense-expands on CPU and, mostly, on GPU); kept as
                a comparison point.

Rows whose id is ≥ E (padding in the expert-parallel buffers) produce zeros in every backend.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dsv2_jax.config import GROUPED_GEMM_IMPLS


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
    """Resolves "auto" for a problem of m rows over e experts of shape [d, f] on the default backend."""
    if impl not in GROUPED_GEMM_IMPLS:
        raise ValueError(f"grouped_gemm must be one of {GROUPED_GEMM_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if m <= e:  # fewer token copies than experts: reading only the selected experts' weights is cheapest
        return "gather"
    device = jax.devices()[0]
    if device.platform == "tpu" and min(d, f) >= 128:  # the Mosaic TPU kernel's minimum dimensions
        return "tokamax"
    if device.platform == "gpu" and float(getattr(device, "compute_capability", 0) or 0) >= 9.0:
        return "tokamax"
    return "blocked"


def sorted_swiglu(xs, group_sizes, w_gate, w_up, w_down, impl: str) -> jnp.ndarray:
    """xs [M, D] sorted by expert, group_sizes [E] (sum ≤ M; rows past the sum give zeros) → [M, D]."""
    if impl == "tokamax":
        try:
            return _swiglu_with(partial(tokamax_ragged_dot, implementation="mosaic"), xs, group_sizes,
                                w_gate, w_up, w_down)
        except NotImplementedError:  # shape, dtype or device the kernel does not cover: stay O(active)
            impl = "blocked"
    if impl == "blocked":
        xs, w_gate, w_up, w_down = _unify_varying(xs, w_gate, w_up, w_down)
        return blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, tile_rows(xs.shape[0], w_gate.shape[0]))
    if impl == "ragged_dot":
        return _swiglu_with(jax.lax.ragged_dot, xs, group_sizes, w_gate, w_up, w_down)
    raise ValueError(f"grouped_gemm {impl!r} does not run on sorted rows")


def tokamax_ragged_dot(lhs, rhs, group_sizes, **kw):
    """tokamax.ragged_dot (imported lazily: only accelerator paths and tests need the library)."""
    import tokamax
    return tokamax.ragged_dot(lhs, rhs, group_sizes, **kw)


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
def tile_rows(m: int, e: int) -> int:
    """Rows per tile: about the mean group size (less padding per active expert), 8..128 (fewer loop steps)."""
    mean = max(1, m // e)
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


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
    xs, group_sizes, w_gate, w_up, w_down = res
    m, d = xs.shape
    expert, start, end, count = _tile_table(group_sizes, m, tile)
    xp = jnp.pad(xs, ((0, tile), (0, 0)))
    dyp = jnp.pad(dy, ((0, tile), (0, 0)))

    def add(w, ex, g):
        return jax.lax.dynamic_update_index_in_dim(w, w[ex] + g, ex, 0)

    def body(i, carry):
        dx, dwg, dwu, dwd = carry
        ex, s = expert[i], start[i]
        valid = _tile_rows_valid(s, end[i], tile)
        # Rows past the group belong to another expert: zero them so they add nothing to this expert's grads.
        xt = jnp.where(valid, jax.lax.dynamic_slice_in_dim(xp, s, tile), 0)
        dyt = jnp.where(valid, jax.lax.dynamic_slice_in_dim(dyp, s, tile), 0)
        g, u = _dot(xt, w_gate[ex]), _dot(xt, w_up[ex])
        sig = jax.nn.sigmoid(g)
        h = (g * sig * u).astype(xs.dtype)
        dh = _dot(dyt, w_down[ex].T)
        du = dh * g * sig
        dg = dh * u * sig * (1 + g * (1 - sig))
        dxt = _dot(dg.astype(xs.dtype), w_gate[ex].T) + _dot(du.astype(xs.dtype), w_up[ex].T)
        return (_masked_store(dx, s, dxt, valid),
                add(dwg, ex, _dot(xt.T, dg.astype(xs.dtype))), add(dwu, ex, _dot(xt.T, du.astype(xs.dtype))),
                add(dwd, ex, _dot(h.T, dyt)))

    zeros = partial(_zeros, like=xs)
    init = (zeros((m + tile, d), xs.dtype), zeros(w_gate.shape, jnp.float32), zeros(w_up.shape, jnp.float32),
            zeros(w_down.shape, jnp.float32))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, count, body, init)
    return (dx[:m], None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype))


blocked_swiglu.defvjp(lambda xs, gs, wg, wu, wd, tile: _blocked_fwd(xs, gs, wg, wu, wd, tile), _blocked_bwd)
