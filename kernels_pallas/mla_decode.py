"""Flash-decoding over the MLA latent cache (absorbed weights, MQA form).

Every head of a sequence attends to the same 576-wide key [c_KV | k_rope] and
512-wide value c_KV, so one program loads a cache block once and scores it
against all H heads at once (q block [H, C]). Long contexts are split over T
(split-K) into independent programs whose partial results are merged with
their log-sum-exp weights.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import resolve_backend
from kernels_pallas.reference import MASK_VALUE, mla_decode_reference, online_softmax_update

_NT = (((1,), (1,)), ((), ()))  # contract last dims: q [H,D] x k [N,D] -> [H,N]


def _scores(q_lat, q_rope, ckv, krope, scale):
  f32 = jnp.float32
  s = lax.dot_general(q_lat, ckv, _NT, preferred_element_type=f32)
  s += lax.dot_general(q_rope, krope, _NT, preferred_element_type=f32)
  return s * scale


def _decode_kernel(len_ref, q_lat_ref, q_rope_ref, ckv_ref, krope_ref,
                   o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, block_t,
                   blocks_per_split):
  b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = len_ref[b]
  start = (split * blocks_per_split + j) * block_t

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  # Blocks past the sequence length are skipped (their DMA is also avoided by
  # the clamped index map, which repeats the previous block index).
  @pl.when(start < length)
  def _step():
    # Rows past the length (including the out-of-bounds tail of a ragged last
    # block, which may hold garbage) are zeroed so p*v stays finite.
    row_ok = start + lax.broadcasted_iota(jnp.int32, (block_t, 1), 0) < length
    ckv = jnp.where(row_ok, ckv_ref[0], 0)
    krope = jnp.where(row_ok, krope_ref[0], 0)
    s = _scores(q_lat_ref[0], q_rope_ref[0], ckv, krope, scale)
    col_ok = start + lax.broadcasted_iota(jnp.int32, (1, block_t), 1) < length
    s = jnp.where(col_ok, s, MASK_VALUE)
    m, l, acc = online_softmax_update(s, m_sc[...], l_sc[...], acc_sc[...], ckv)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0  # whole split beyond the length: zero weight in the merge
    o_ref[0, 0] = jnp.where(empty, 0.0, acc_sc[...] / jnp.where(empty, 1.0, l))
    lse_ref[0, 0] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l))


def combine_splits(o_part, lse_part, dtype):
  """Merge per-split results o_part [B,S,H,C], lse_part [B,S,H] (fp32)."""
  lse = jax.nn.logsumexp(lse_part, axis=1)
  w = jnp.exp(lse_part - lse[:, None])
  o = jnp.einsum("bsh,bshc->bhc", w, o_part)
  return o.astype(dtype), lse


def _decode_pallas(q_lat, q_rope, ckv, krope, lengths, *, scale, block_t,
                   num_splits, interpret):
  b, h, c = q_lat.shape
  t, r = ckv.shape[1], krope.shape[2]
  n_blocks = pl.cdiv(t, block_t)
  bps = pl.cdiv(n_blocks, num_splits)

  def kv_map(bi, si, ji, len_ref):
    # Clamp to the last block holding valid entries: repeated indices are not
    # re-fetched by the TPU pipeline, so no bandwidth is spent past the length.
    last = jnp.maximum(pl.cdiv(len_ref[bi], block_t) - 1, 0)
    return bi, jnp.minimum(si * bps + ji, last), 0

  q_map = lambda bi, si, ji, len_ref: (bi, 0, 0)
  out_map = lambda bi, si, ji, len_ref: (bi, si, 0, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, num_splits, bps),
      in_specs=[pl.BlockSpec((1, h, c), q_map), pl.BlockSpec((1, h, r), q_map),
                pl.BlockSpec((1, block_t, c), kv_map),
                pl.BlockSpec((1, block_t, r), kv_map)],
      out_specs=[pl.BlockSpec((1, 1, h, c), out_map),
                 pl.BlockSpec((1, 1, h, 1), out_map)],
      scratch_shapes=[pltpu.VMEM((h, 1), jnp.float32),
                      pltpu.VMEM((h, 1), jnp.float32),
                      pltpu.VMEM((h, c), jnp.float32)])
  kernel = functools.partial(_decode_kernel, scale=scale, block_t=block_t,
                             blocks_per_split=bps)
  f32 = jnp.float32
  o_part, lse_part = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, c), f32),
                 jax.ShapeDtypeStruct((b, num_splits, h, 1), f32)],
      grid_spec=grid_spec,
      interpret=interpret,
      compiler_params=None if interpret else pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      name="mla_decode",
  )(lengths, q_lat, q_rope, ckv, krope)
  return combine_splits(o_part, lse_part[..., 0], q_lat.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "num_splits", "backend"))
def mla_decode(q_lat, q_rope, ckv, krope, lengths, *, scale, block_t=None,
               num_splits=None, backend="auto"):
  """Absorbed-MLA decode attention over the latent cache.

  q_lat [B,H,C], q_rope [B,H,R], ckv [B,T,C], krope [B,T,R], lengths [B] int32
  (1 <= length <= T; entries at positions >= length are ignored).
  Returns (o_lat [B,H,C] in q dtype, lse [B,H] fp32).
  block_t: cache rows per block. num_splits: T-splits (split-K); None picks
  enough to fill the device. backend: "auto" | "interpret" | "mosaic_tpu" |
  "mosaic_gpu" | "xla" (pure-JAX reference).
  """
  backend = resolve_backend(backend)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, ckv.shape[1])
  if backend == "xla":
    return mla_decode_reference(q_lat, q_rope, ckv, krope, lengths, scale=scale)
  if backend == "mosaic_gpu":
    from kernels_pallas import mla_decode_gpu  # imports Hopper-only modules
    return mla_decode_gpu.mla_decode_gpu(
        q_lat, q_rope, ckv, krope, lengths, scale=scale,
        block_t=block_t or 64, num_splits=num_splits)
  block_t = block_t or (128 if backend == "mosaic_tpu" else 64)
  n_blocks = pl.cdiv(ckv.shape[1], block_t)
  if num_splits is None:  # TPU v4/v5p megacore: 2 cores share the parallel axes
    num_splits = min(n_blocks, max(1, 2 // q_lat.shape[0]))
  num_splits = max(1, min(num_splits, n_blocks))
  return _decode_pallas(q_lat, q_rope, ckv, krope, lengths, scale=scale,
                        block_t=block_t, num_splits=num_splits,
                        interpret=backend == "interpret")
