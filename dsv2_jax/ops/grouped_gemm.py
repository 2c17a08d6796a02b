"""The grouped GEMM behind every routed-expert path: cost follows the activated experts, not the stored ones.

`grouped_expert_mlp(x, ids, w_gate, w_up, w_down, impl)` computes, for each row i, expert ids[i]'s SwiGLU
`down(silu(x_i W_gate) * x_i W_up)`. The single-device dropless path, both expert-parallel dispatch modes and
decode all call it; `impl` (config `grouped_gemm`) picks the backend, "auto" picks per platform and shape:

  * "gather"  — decode-sized batches (M ≤ E rows): gather only the selected experts' weights, batched mat-vecs.
                A B=1 step reads K/E of the expert bytes and skips the sort.
  * "tokamax" — tokamax's Pallas Mosaic `ragged_dot` (TPU v5+, NVIDIA Ampere+ / Hopper), forward and backward
                kernels; auto on TPU and on GPUs of compute capability ≥ 9.0. A shape/dtype the kernel rejects
                at trace time falls back to "blocked".
  * "blocked" — the generic O(active) path (CPU, older GPUs): rows sorted by expert, each expert's rows
                padded to whole tiles, a loop whose every step runs a batch of tiles (each one expert's fused
                SwiGLU), with a custom VJP of the same shape: forward and backward cost ~(N·K + active_experts
                · tile) rows, not N·K·E; empty experts cost nothing but O(E) integers, and each expert's weight
                gradient is summed in fp32 over its tiles and written once into a zero buffer of the weights'
                dtype (no fp32 [E, D, F] temporaries for bf16 weights).
  * "ragged_dot" — `jax.lax.ragged_dot` as XLA lowers it (dense-expands on CPU and, mostly, on GPU); kept as
                a comparison point.

Rows whose id is ≥ E (padding in the expert-parallel buffers) produce zeros in every backend.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

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
        if tokamax_accepts(xs, group_sizes, w_gate, w_up, w_down):
            return _swiglu_with(_tokamax_mosaic, xs, group_sizes, w_gate, w_up, w_down)
        impl = "blocked"  # a shape, dtype or device the kernels do not cover: stay O(active)
    if impl == "blocked":
        xs, w_gate, w_up, w_down = _unify_varying(xs, w_gate, w_up, w_down)
        e, d, f = w_gate.shape
        plan = blocked_plan(xs.shape[0], e, d, f, jnp.dtype(w_gate.dtype).itemsize)
        return blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, *plan)
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


# ---- blocked: batched tiles in a loop, with a matching backward -------------------------------------------
class TileLayout(NamedTuple):
    """Each expert's sorted rows padded to whole tiles, the experts' tiles back to back (empty experts: none).

    Static sizes are bounds (Σ ceil(n_e / tile) ≤ M / tile + min(E, M)); only `steps` loop steps run."""
    expert: jnp.ndarray  # [T] int32, the expert of each tile; E for tiles past the last real one
    slot: jnp.ndarray    # [M] int32, each sorted row's position in the [T * tile] padded rows; T * tile if unused
    steps: jnp.ndarray   # scalar int32, loop steps (of `chunk` tiles) that hold real tiles


def blocked_plan(m: int, e: int, d: int, f: int, itemsize: int) -> tuple[int, int]:
    """(tile rows, tiles per loop step) for M rows over E experts of shape [D, F].

    Padding costs < tile rows per active expert, so the tile is about half the mean group size (16..128 rows:
    smaller batched GEMMs run poorly); a loop step batches tiles up to ~512 rows, so the per-step overhead is
    paid per ~512 rows rather than per expert. Gathered weights per step: ≤ the stack itself and ≤ 16 MiB."""
    tile = int(min(128, max(16, 1 << max(0, (m // (2 * e)).bit_length() - 1))))
    chunk = max(1, min(512 // tile, e, (16 << 20) // (3 * d * f * itemsize), m // tile + min(e, m) + 1))
    return tile, chunk


def tile_layout(group_sizes, m: int, tile: int, chunk: int) -> TileLayout:
    e = group_sizes.shape[0]
    tiles = (group_sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    n_tiles = -(-(m // tile + min(e, m) + 1) // chunk) * chunk
    expert = jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right", method="compare_all").astype(jnp.int32)
    row_end = jnp.cumsum(group_sizes)
    rows = jnp.arange(m)
    row_expert = jnp.searchsorted(row_end, rows, side="right", method="compare_all")  # E past the last group
    ex = jnp.minimum(row_expert, e - 1)
    slot = rows - (row_end[ex] - group_sizes[ex]) + (tile_end[ex] - tiles[ex]) * tile
    slot = jnp.where(row_expert < e, slot, n_tiles * tile).astype(jnp.int32)
    return TileLayout(expert, slot, ((tile_end[-1] + chunk - 1) // chunk).astype(jnp.int32))


def _to_tiles(rows, lay: TileLayout, tile: int):
    """[M, D] sorted rows → [T, tile, D], padding rows zero."""
    t = lay.expert.shape[0]
    z = _zeros((t * tile, rows.shape[1]), rows.dtype, rows)
    return z.at[lay.slot].set(rows, mode="drop", unique_indices=True).reshape(t, tile, -1)


def _from_tiles(tiles, lay: TileLayout):
    """[T, tile, D] → [M, D] sorted rows; rows outside every group are zero."""
    return tiles.reshape(-1, tiles.shape[-1]).at[lay.slot].get(mode="fill", fill_value=0)


def _step_tiles(lay: TileLayout, i, chunk: int, e: int):
    """Step i's tiles: their experts (E past the last tile) and the same clamped for indexing weights."""
    ex = jax.lax.dynamic_slice_in_dim(lay.expert, i * chunk, chunk)
    return ex, jnp.minimum(ex, e - 1)


def _expert_sums(ex, parts, carry_ex, carry):
    """Sums `parts` [C, ...] over runs of equal `ex` [C] (one expert's tiles are consecutive) in fp32 →
    (run sums [C, ...], each run's expert [C], E for unused runs); the first run continues `carry` when it holds
    the previous step's last expert `carry_ex`."""
    run = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32), (ex[1:] != ex[:-1]).astype(jnp.int32)]))
    sums = jnp.zeros_like(parts).at[run].add(parts).at[0].add(jnp.where(ex[0] == carry_ex, carry, 0))
    run_ex = jnp.full_like(ex, jnp.iinfo(jnp.int32).max).at[run].min(ex)
    return sums, run_ex, sums[run[-1]]


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


def _bdot(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, tile: int, chunk: int):
    """xs [M, D] sorted by expert, group_sizes [E] → [M, D]; each loop step runs `chunk` tiles of `tile` rows,
    every tile one expert's fused SwiGLU (weights gathered per tile)."""
    return _blocked_fwd(xs, group_sizes, w_gate, w_up, w_down, tile, chunk)[0]


def _blocked_fwd(xs, group_sizes, w_gate, w_up, w_down, tile, chunk):
    m, e = xs.shape[0], w_gate.shape[0]
    lay = tile_layout(group_sizes, m, tile, chunk)
    xt = _to_tiles(xs, lay, tile)

    def body(i, yt):
        _, ex = _step_tiles(lay, i, chunk, e)
        x = jax.lax.dynamic_slice_in_dim(xt, i * chunk, chunk)
        h = jax.nn.silu(_bdot("ctd,cdf->ctf", x, w_gate[ex])) * _bdot("ctd,cdf->ctf", x, w_up[ex])
        y = _bdot("ctf,cfd->ctd", h.astype(xs.dtype), w_down[ex]).astype(xs.dtype)
        return jax.lax.dynamic_update_slice_in_dim(yt, y, i * chunk, 0)

    yt = jax.lax.fori_loop(0, lay.steps, body, _zeros(xt.shape, xt.dtype, xs))
    return _from_tiles(yt, lay), (xs, group_sizes, w_gate, w_up, w_down)


def _blocked_bwd(tile, chunk, res, dy):
    """Recomputes each tile's activations; dX tile by tile, and each weight gradient summed per expert in fp32
    over that expert's (consecutive) tiles and written once into a zero buffer of the weights' dtype."""
    xs, group_sizes, w_gate, w_up, w_down = res
    m, e = xs.shape[0], w_gate.shape[0]
    lay = tile_layout(group_sizes, m, tile, chunk)
    xt, dyt = _to_tiles(xs, lay, tile), _to_tiles(dy.astype(xs.dtype), lay, tile)

    def body(i, carry):
        dxt, dws, carry_ex, sums = carry
        ex_raw, ex = _step_tiles(lay, i, chunk, e)
        x = jax.lax.dynamic_slice_in_dim(xt, i * chunk, chunk)
        dyc = jax.lax.dynamic_slice_in_dim(dyt, i * chunk, chunk)
        wg, wu, wd = w_gate[ex], w_up[ex], w_down[ex]
        g, u = _bdot("ctd,cdf->ctf", x, wg), _bdot("ctd,cdf->ctf", x, wu)
        sig = jax.nn.sigmoid(g)
        h = (g * sig * u).astype(xs.dtype)
        dh = _bdot("ctd,cfd->ctf", dyc, wd)
        du = (dh * g * sig).astype(xs.dtype)
        dg = (dh * u * sig * (1 + g * (1 - sig))).astype(xs.dtype)
        dx = _bdot("ctf,cdf->ctd", dg, wg) + _bdot("ctf,cdf->ctd", du, wu)
        parts = (_bdot("ctd,ctf->cdf", x, dg), _bdot("ctd,ctf->cdf", x, du), _bdot("ctf,ctd->cfd", h, dyc))
        runs = [_expert_sums(ex_raw, p, carry_ex, c) for p, c in zip(parts, sums)]
        # A run's sum is final unless the expert continues into the next step, which then overwrites it.
        dws = tuple(w.at[run_ex].set(r.astype(w.dtype), mode="drop") for w, (r, run_ex, _) in zip(dws, runs))
        return (jax.lax.dynamic_update_slice_in_dim(dxt, dx.astype(xs.dtype), i * chunk, 0), dws, ex_raw[-1],
                tuple(last for _, _, last in runs))

    weights = (w_gate, w_up, w_down)
    init = (_zeros(xt.shape, xt.dtype, xs), tuple(_zeros(w.shape, w.dtype, xs) for w in weights), _unify_varying(jnp.int32(e), xs)[0],
            tuple(_zeros(w.shape[1:], jnp.float32, xs) for w in weights))
    dxt, (dwg, dwu, dwd), _, _ = jax.lax.fori_loop(0, lay.steps, body, init)
    return _from_tiles(dxt, lay), None, dwg, dwu, dwd


blocked_swiglu.defvjp(lambda xs, gs, wg, wu, wd, tile, chunk: _blocked_fwd(xs, gs, wg, wu, wd, tile, chunk),
                      _blocked_bwd)
