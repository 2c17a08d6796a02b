"""Causal flash attention for MLA prefill/training shapes (qk dim != v dim).

V2 uses qk head dim 192 (128 nope + 64 rope) and v head dim 128; both are
used as-is (no padding to a common 256). Packed sequences are supported with
segment ids. Forward saves the per-row log-sum-exp; backward recomputes the
probabilities in two kernels (dk/dv over q blocks, dq over k blocks), so no
[T, T] matrix is ever stored.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.backends import resolve_backend
from kernels_pallas.reference import MASK_VALUE, mla_attention_reference, online_softmax_update

_NT = (((1,), (1,)), ((), ()))  # a [M,D] x b [N,D] -> [M,N]
_TN = (((0,), (0,)), ((), ()))  # a [K,M] x b [K,N] -> [M,N]
_NN = (((1,), (0,)), ((), ()))
# Pad ids for rows added to reach a block multiple; distinct so padded keys are
# never attended to by anything (padded query rows are dropped anyway).
_PAD_Q_SEG, _PAD_KV_SEG = -1, -2


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(qi, ki, q_seg, kv_seg, bq, bk, causal):
    """[bq, bk] visibility of key block ki to query block qi."""
    ok = q_seg == kv_seg  # [bq,1] == [1,bk]
    if causal:
        q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        ok = ok & (q_pos >= k_pos)
    return ok


def _needed(qi, ki, bq, bk, causal):
    """Whether key block ki has any key at or before the last query of block qi."""
    return ki * bk <= qi * bq + bq - 1 if causal else True


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static kernel config (hashable, as custom_vjp nondiff_argnums require)."""

    scale: float
    causal: bool
    bq: int
    bk: int
    interpret: bool


def _call(cfg, kernel, grid, in_specs, out_specs, out_shape, scratch):
    # The last grid axis accumulates into scratch, so it must run in order.
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        interpret=cfg.interpret,
        compiler_params=None
        if cfg.interpret
        else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )


# -- specs: q-like tensors are [B,H,T,D] blocked on T; segment ids [B,T,1] / [B,1,T].
def _row_spec(block, d, row_of):
    return pl.BlockSpec((1, 1, block, d), lambda b, h, i, j: (b, h, row_of(i, j), 0))


def _q_seg_spec(block, row_of):
    return pl.BlockSpec((1, block, 1), lambda b, h, i, j: (b, row_of(i, j), 0))


def _kv_seg_spec(block, row_of):
    return pl.BlockSpec((1, 1, block), lambda b, h, i, j: (b, 0, row_of(i, j)))


def _fwd_kernel(q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, cfg):
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_needed(qi, ki, cfg.bq, cfg.bk, cfg.causal))
    def _step():
        s = _dot(q_ref[0, 0], k_ref[0, 0], _NT) * cfg.scale
        ok = _mask(qi, ki, q_seg_ref[0], kv_seg_ref[0], cfg.bq, cfg.bk, cfg.causal)
        s = jnp.where(ok, s, MASK_VALUE)
        m_sc[...], l_sc[...], acc_sc[...] = online_softmax_update(s, m_sc[...], l_sc[...], acc_sc[...], v_ref[0, 0])

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        o_ref[0, 0] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[0, 0] = m_sc[...] + jnp.log(l_sc[...])


def _probs(cfg, qi, ki, q_seg_ref, kv_seg_ref, q, k, lse):
    s = _dot(q, k, _NT) * cfg.scale
    ok = _mask(qi, ki, q_seg_ref[0], kv_seg_ref[0], cfg.bq, cfg.bk, cfg.causal)
    return jnp.where(ok, jnp.exp(s - lse), 0.0)


def _dkv_kernel(
    q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, cfg
):
    ki, qi = pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_needed(qi, ki, cfg.bq, cfg.bk, cfg.causal))
    def _step():
        q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
        p = _probs(cfg, qi, ki, q_seg_ref, kv_seg_ref, q, k, lse_ref[0, 0])
        dv_sc[...] += _dot(p.astype(do.dtype), do, _TN)
        ds = p * (_dot(do, v, _NT) - delta_ref[0, 0])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, _TN) * cfg.scale

    @pl.when(qi == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[0, 0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, cfg):
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_needed(qi, ki, cfg.bq, cfg.bk, cfg.causal))
    def _step():
        q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
        p = _probs(cfg, qi, ki, q_seg_ref, kv_seg_ref, q, k, lse_ref[0, 0])
        ds = p * (_dot(do, v, _NT) - delta_ref[0, 0])
        dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN) * cfg.scale

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[0, 0] = dq_sc[...].astype(dq_ref.dtype)


def _own(i, j):
    """Block index of the tensor the grid's outer (parallel) block axis walks."""
    return i


def _inner_maps(cfg):
    """Block-index maps of the inner (sequential) axis j: k blocks for a q-block
    grid, and q blocks for a k-block grid.

    Under causality, skipped blocks map to an already-fetched block index so the
    pipeline issues no DMA for them.
    """
    bq, bk = cfg.bq, cfg.bk
    if not cfg.causal:
        return (lambda i, j: j), (lambda i, j: j)
    return (lambda i, j: jnp.minimum(j, (i * bq + bq - 1) // bk), lambda i, j: jnp.maximum(j, (i * bk) // bq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg):
    return _flash_fwd(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg):
    b, h, t, d = q.shape
    dv = v.shape[-1]
    q_of, (k_of, _) = _own, _inner_maps(cfg)
    o, lse = _call(
        cfg,
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, h, t // cfg.bq, t // cfg.bk),
        in_specs=[
            _q_seg_spec(cfg.bq, q_of),
            _kv_seg_spec(cfg.bk, k_of),
            _row_spec(cfg.bq, d, q_of),
            _row_spec(cfg.bk, d, k_of),
            _row_spec(cfg.bk, dv, k_of),
        ],
        out_specs=[_row_spec(cfg.bq, dv, q_of), _row_spec(cfg.bq, 1, q_of)],
        out_shape=[jax.ShapeDtypeStruct((b, h, t, dv), q.dtype), jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
        scratch=[
            pltpu.VMEM((cfg.bq, 1), jnp.float32),
            pltpu.VMEM((cfg.bq, 1), jnp.float32),
            pltpu.VMEM((cfg.bq, dv), jnp.float32),
        ],
    )(q_seg, kv_seg, q, k, v)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    b, h, t, d = q.shape
    dv = v.shape[-1]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1, keepdims=True)
    q_of, k_of_kgrid = _own, _own
    k_of, q_of_kgrid = _inner_maps(cfg)

    def specs(qm, km):  # inputs shared by both backward kernels
        return [
            _q_seg_spec(cfg.bq, qm),
            _kv_seg_spec(cfg.bk, km),
            _row_spec(cfg.bq, d, qm),
            _row_spec(cfg.bk, d, km),
            _row_spec(cfg.bk, dv, km),
            _row_spec(cfg.bq, dv, qm),
            _row_spec(cfg.bq, 1, qm),
            _row_spec(cfg.bq, 1, qm),
        ]

    args = (q_seg, kv_seg, q, k, v, do, lse, delta)
    dk, dvv = _call(
        cfg,
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(b, h, t // cfg.bk, t // cfg.bq),
        in_specs=specs(q_of_kgrid, k_of_kgrid),
        out_specs=[_row_spec(cfg.bk, d, k_of_kgrid), _row_spec(cfg.bk, dv, k_of_kgrid)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch=[pltpu.VMEM((cfg.bk, d), jnp.float32), pltpu.VMEM((cfg.bk, dv), jnp.float32)],
    )(*args)
    dq = _call(
        cfg,
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, h, t // cfg.bq, t // cfg.bk),
        in_specs=specs(q_of, k_of),
        out_specs=_row_spec(cfg.bq, d, q_of),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[pltpu.VMEM((cfg.bq, d), jnp.float32)],
    )(*args)
    return dq, dk, dvv, None, None


_flash.defvjp(lambda cfg, *a: _flash_fwd(cfg, *a), _flash_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "causal", "block_q", "block_k", "backend"))
def flash_mla_attention(q, k, v, *, scale, segment_ids=None, causal=True, block_q=None, block_k=None, backend="auto"):
    """Flash attention; q,k [B,T,H,Dqk], v [B,T,H,Dv] -> o [B,T,H,Dv] (q dtype).

    segment_ids [B,T] int32 (>= 0) restricts attention to equal ids. Differentiable
    w.r.t. q, k, v. backend: "auto" | "interpret" | "mosaic_tpu" | "xla" (the
    reference). GPUs run tokamax's flash attention instead (dsv2_jax.ops.attention_backend).
    """
    backend = resolve_backend(backend)
    if backend == "mosaic_gpu":
        raise ValueError("flash_mla_attention has no Mosaic GPU kernel; on GPU use tokamax's flash attention "
                         "(dsv2_jax.ops.attention_backend.tokamax_attention)")
    if backend == "xla":
        return mla_attention_reference(q, k, v, scale=scale, segment_ids=segment_ids, causal=causal)
    b, t = q.shape[:2]
    bq = block_q or (128 if backend == "mosaic_tpu" else 64)
    bk = block_k or bq
    tp = pl.cdiv(t, math.lcm(bq, bk)) * math.lcm(bq, bk)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = ((0, 0), (0, tp - t))
    q_seg = jnp.pad(seg, pad, constant_values=_PAD_Q_SEG)[:, :, None]
    kv_seg = jnp.pad(seg, pad, constant_values=_PAD_KV_SEG)[:, None, :]
    to_bhtd = lambda x: jnp.pad(x, pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)
    cfg = _Cfg(float(scale), bool(causal), bq, bk, backend == "interpret")
    o = _flash(cfg, to_bhtd(q), to_bhtd(k), to_bhtd(v), q_seg, kv_seg)
    return o.transpose(0, 2, 1, 3)[:, :t]
