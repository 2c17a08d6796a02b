"""Flash-decoding over a *paged* MLA latent cache (absorbed weights, MQA form).

The cache is one pool of fixed-size pages per layer stack, ckv [L, P, page, C] / krope [L, P, page, R]; row b's
tokens live in the pages listed by block_tables[b] (token t at page block_tables[b, t // page], slot t % page).
The kernels are `mla_decode`'s: same per-block body, same split-K merge (`combine_splits`); only the address of a
cache block differs. Mosaic TPU: the index map reads the page id out of the block table, a scalar-prefetch
operand, so the pipeline DMAs each page straight from the pool with no gather copy. Hopper (Mosaic GPU):
`_decode_gpu` with block_tables, whose pipeline reads the page id from the table in global memory per block.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.backends import resolve_backend
from kernels_pallas.mla_decode import (_decode_gpu, _decode_kernel, _default_block, decode_supported, gpu_num_splits,
                                      tpu_decode_call)
from kernels_pallas.reference import mla_decode_reference


def gather_pages(pool, block_tables, layer):
    """pool [L, P, page, X], block_tables [B, N] → row b's cache [B, N·page, X] (layer `layer`)."""
    pages = pool[layer, block_tables]  # [B, N, page, X]: one gather of the listed pages, no slice of the pool
    return pages.reshape(pages.shape[0], -1, pages.shape[-1])


def paged_mla_decode_reference(q_lat, q_rope, ckv, krope, block_tables, lengths, *, scale, layer):
    """Pure-jnp paged decode: gather each row's pages, then `mla_decode_reference`. Returns (o_lat, lse)."""
    return mla_decode_reference(q_lat, q_rope, gather_pages(ckv, block_tables, layer),
                                gather_pages(krope, block_tables, layer), lengths, scale=scale)


def _paged_kernel(len_ref, layer_ref, bt_ref, *refs, **kw):
    del bt_ref  # consumed by the index maps only
    _decode_kernel(len_ref, layer_ref, *refs, **kw)


def _paged_pallas(q_lat, q_rope, ckv, krope, block_tables, lengths, layer, *, scale, num_splits, interpret):
    page = ckv.shape[2]
    bps = pl.cdiv(block_tables.shape[1], num_splits)

    def kv_map(bi, si, ji, len_ref, layer_ref, bt_ref):
        # Clamped to the row's last valid page: a repeated block index is not re-fetched.
        last = jnp.maximum(pl.cdiv(len_ref[bi], page) - 1, 0)
        return layer_ref[0], bt_ref[bi, jnp.minimum(si * bps + ji, last)], 0, 0  # the page dim is the kernel's 1

    return tpu_decode_call(_paged_kernel, (lengths, layer, block_tables), q_lat, q_rope, ckv, krope, kv_map=kv_map,
                           block_t=page, bps=bps, num_splits=num_splits, scale=scale, interpret=interpret,
                           name="paged_mla_decode")


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "backend"))
def paged_mla_decode(q_lat, q_rope, ckv, krope, block_tables, lengths, *, scale, layer=0, num_splits=None,
                     backend="auto"):
    """Absorbed-MLA decode attention over a paged latent cache.

    q_lat [B,H,C], q_rope [B,H,R]; ckv [L,P,page,C], krope [L,P,page,R] (the pools of a layer stack; `layer`, an
    int32 scalar that may be traced, picks the layer in place); block_tables [B,N] int32 page ids; lengths [B]
    int32 (1 <= length <= N·page; positions >= length are ignored, as are pages past the length).
    Returns (o_lat [B,H,C] in q dtype, lse [B,H] fp32). num_splits: split-K over pages (None fills the device).
    backend: "auto" | "interpret" | "mosaic_tpu" | "mosaic_gpu" | "xla" (gather + reference); "mosaic_gpu" (the
    Hopper kernel) raises ValueError for a pool `decode_supported` rejects (page size = its max_len).
    """
    backend = resolve_backend(backend)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    n = block_tables.shape[1]
    page = ckv.shape[2]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, n * page)
    block_tables = block_tables.astype(jnp.int32)
    if backend == "xla":
        return paged_mla_decode_reference(q_lat, q_rope, ckv, krope, block_tables, lengths, scale=scale,
                                          layer=layer[0])
    if backend == "mosaic_gpu":
        block_t = _default_block(backend)
        if not decode_supported(backend, q_lat.dtype, ckv.dtype, page, block_t):
            raise ValueError(f"paged_mla_decode backend 'mosaic_gpu' needs q and pool in one 16-bit dtype and pages "
                             f"of whole {block_t}-row blocks, got {q_lat.dtype} / {ckv.dtype} with page size {page} "
                             "(dsv2_jax.ops.attention_backend decodes these with 'xla')")
        n_blocks = n * (page // block_t)
        splits = max(1, min(num_splits or gpu_num_splits(*q_lat.shape[:2]), n_blocks))
        return _decode_gpu(q_lat, q_rope, ckv, krope, lengths, layer, scale=scale, block_t=block_t,
                           num_splits=splits, block_tables=block_tables)
    if num_splits is None:
        num_splits = pl.cdiv({"mosaic_tpu": 2}.get(backend, 1), q_lat.shape[0])
    num_splits = max(1, min(num_splits, n))
    return _paged_pallas(q_lat, q_rope, ckv, krope, block_tables, lengths, layer, scale=scale,
                         num_splits=num_splits, interpret=backend == "interpret")
