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

from kernels_pallas.backends import resolve_backend
from kernels_pallas.reference import MASK_VALUE, mla_decode_reference, online_softmax_update

_NT = (((1,), (1,)), ((), ()))  # contract last dims: q [H,D] x k [N,D] -> [H,N]


def _scores(q_lat, q_rope, ckv, krope, scale):
    f32 = jnp.float32
    s = lax.dot_general(q_lat, ckv, _NT, preferred_element_type=f32)
    s += lax.dot_general(q_rope, krope, _NT, preferred_element_type=f32)
    return s * scale


def _decode_kernel(
    len_ref,
    layer_ref,
    q_lat_ref,
    q_rope_ref,
    ckv_ref,
    krope_ref,
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    scale,
    block_t,
    blocks_per_split,
):
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


def tpu_decode_call(kernel, prefetch, q_lat, q_rope, ckv, krope, *, kv_map, block_t, bps, num_splits, scale,
                    interpret, name):
    """The Mosaic TPU flash-decoding launch shared by the dense and the paged cache: grid (row, split, block),
    scalar-prefetch operands `prefetch` (lengths, layer, ...) that every index map receives, and kv_map giving
    the (layer, ·, ·, 0) address of block j of a cache [L, ·, ·, C]. Returns (o_lat [B,H,C], lse [B,H])."""
    b, h, c = q_lat.shape
    r = krope.shape[3]
    q_map = lambda bi, si, ji, *_: (bi, 0, 0)
    out_map = lambda bi, si, ji, *_: (bi, si, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, num_splits, bps),
        in_specs=[
            pl.BlockSpec((1, h, c), q_map),
            pl.BlockSpec((1, h, r), q_map),
            pl.BlockSpec((None, 1, block_t, c), kv_map),  # the layer dim is squeezed away
            pl.BlockSpec((None, 1, block_t, r), kv_map),
        ],
        out_specs=[pl.BlockSpec((1, 1, h, c), out_map), pl.BlockSpec((1, 1, h, 1), out_map)],
        scratch_shapes=[
            pltpu.VMEM((h, 1), jnp.float32),
            pltpu.VMEM((h, 1), jnp.float32),
            pltpu.VMEM((h, c), jnp.float32),
        ],
    )
    kernel = functools.partial(kernel, scale=scale, block_t=block_t, blocks_per_split=bps)
    f32 = jnp.float32
    o_part, lse_part = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, c), f32), jax.ShapeDtypeStruct((b, num_splits, h, 1), f32)],
        grid_spec=grid_spec,
        interpret=interpret,
        compiler_params=None
        if interpret
        else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name=name,
    )(*prefetch, q_lat, q_rope, ckv, krope)
    return combine_splits(o_part, lse_part[..., 0], q_lat.dtype)


def _decode_pallas(q_lat, q_rope, ckv, krope, lengths, layer, *, scale, block_t, num_splits, interpret):
    bps = pl.cdiv(pl.cdiv(ckv.shape[2], block_t), num_splits)

    def kv_map(bi, si, ji, len_ref, layer_ref):
        # Clamp to the last block holding valid entries: repeated indices are not
        # re-fetched by the TPU pipeline, so no bandwidth is spent past the length.
        last = jnp.maximum(pl.cdiv(len_ref[bi], block_t) - 1, 0)
        return layer_ref[0], bi, jnp.minimum(si * bps + ji, last), 0

    return tpu_decode_call(_decode_kernel, (lengths, layer), q_lat, q_rope, ckv, krope, kv_map=kv_map,
                           block_t=block_t, bps=bps, num_splits=num_splits, scale=scale, interpret=interpret,
                           name="mla_decode")


# -- Hopper (Mosaic GPU) variant ------------------------------------------------
# One warpgroup per CTA owns a 64-head tile (the WGMMA M dimension; fewer heads
# are zero-padded) and one half of the 512-wide value dim: a [64, 512] fp32
# accumulator would need 256 registers/thread. Both halves of the cache block
# are still loaded (scores need all of C), as "own" (also the value) and
# "other" column blocks; the two CTAs of a pair hit the same lines in L2.
_GPU_HEADS, _GPU_SPLIT_V = 64, 2


def _gpu_load_queries(ql_gmem, qr_gmem, bi, heads, v, half, q_own, q_other, q_r, bar):
    """Copy this tile's query into SMEM: its own and the other half of q_lat, and q_rope."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    srcs = (
        ql_gmem.at[bi, heads, pl.ds(v * half, half)],
        ql_gmem.at[bi, heads, pl.ds((1 - v) * half, half)],
        qr_gmem.at[bi, heads],
    )
    for i, (src, dst) in enumerate(zip(srcs, (q_own, q_other, q_r))):
        plgpu.copy_gmem_to_smem(src, dst, bar.at[i])
    for i in range(3):
        plgpu.barrier_wait(bar.at[i])


def _gpu_block_step(queries, ckv_own, ckv_other, kr, carry, *, pos0, length, scale, block_t):
    """One cache block of the online softmax for a 64-head tile: WGMMA scores over both latent halves and the
    rope part, positions >= length masked, then p @ ckv_own into the fp32 accumulator. carry = (acc, m, l)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    q_own, q_other, q_r = queries
    acc, m, l = carry

    def qk(s_ref):
        plgpu.wgmma(s_ref, q_own, ckv_own.transpose((1, 0)))
        plgpu.wgmma(s_ref, q_other, ckv_other.transpose((1, 0)))
        plgpu.wgmma(s_ref, q_r, kr.transpose((1, 0)))
        return s_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((_GPU_HEADS, block_t), jnp.float32)) * scale
    pos = pos0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
    s = jnp.where(pos < length, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(q_own.dtype), ckv_own)

    return pl.run_state(pv)(plgpu.ACC.init(acc)), m_new, l


def _gpu_store(acc, m, l, o_dst, lse_dst, half):
    """Normalise and write this tile's partial o [64, half] and lse [64] (staged through SMEM)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def store(o_smem, lse_smem):
        o_smem[...] = acc / lax.broadcast_in_dim(l, acc.shape, [0])
        lse_smem[...] = m + jnp.log(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_dst)
        plgpu.copy_smem_to_gmem(lse_smem, lse_dst)  # same in both halves
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((_GPU_HEADS, half), jnp.float32), plgpu.SMEM((_GPU_HEADS,), jnp.float32))


def _gpu_body(len_gmem, layer_gmem, ql_gmem, qr_gmem, ckv_gmem, kr_gmem, o_gmem, lse_gmem, *, cache_row, cache_block,
              scale, block_t, blocks_per_split, n_blocks, dtype):
    """One CTA: (head tile hb, value half v, split s, row b) pipelines its blocks of layer `layer` of row b.

    The cache refs are [L, rows, blocks·block_t, X]; row b's logical block j (< n_blocks) is block
    cache_block(b, j) of ckv_gmem[layer, cache_row(b)] (dense: (b, j); paged: a block-table lookup)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    hb, v = lax.axis_index("hb"), lax.axis_index("v")
    split, bi = lax.axis_index("s"), lax.axis_index("b")
    layer_i = layer_gmem[0]
    heads = pl.ds(hb * _GPU_HEADS, _GPU_HEADS)
    length, row = len_gmem[bi], cache_row(bi)
    first = split * blocks_per_split
    n = jnp.clip(pl.cdiv(length, block_t) - first, 0, blocks_per_split)  # blocks to visit
    half, r = ckv_gmem.shape[-1] // _GPU_SPLIT_V, kr_gmem.shape[-1]
    # 128-byte swizzled (8, 64)-tiled SMEM tiles: the operand layout WGMMA reads.
    mma = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def compute(q_own, q_other, q_r, bar):
        _gpu_load_queries(ql_gmem, qr_gmem, bi, heads, v, half, q_own, q_other, q_r, bar)

        def step(idx, ckv_own, ckv_other, kr, carry):
            return _gpu_block_step((q_own, q_other, q_r), ckv_own, ckv_other, kr, carry,
                                   pos0=(first + idx[0]) * block_t, length=length, scale=scale, block_t=block_t)

        block = lambda j: cache_block(bi, jnp.minimum(first + j, n_blocks - 1))  # noqa: E731
        wg = plgpu.Layout.WGMMA
        init = (
            plgpu.layout_cast(jnp.zeros((_GPU_HEADS, half), jnp.float32), wg),
            plgpu.layout_cast(jnp.full((_GPU_HEADS,), -jnp.inf, jnp.float32), wg.reduce(1)),
            plgpu.layout_cast(jnp.zeros((_GPU_HEADS,), jnp.float32), wg.reduce(1)),
        )
        # An empty split still runs one fully masked step (keeping the pipeline
        # grid non-empty): m = MASK_VALUE gives lse ~ -1e30, i.e. zero weight in
        # the merge, and o stays finite.
        return plgpu.emit_pipeline(
            step,
            grid=(jnp.maximum(n, 1),),
            in_specs=[
                plgpu.BlockSpec((block_t, half), lambda j: (block(j), v), transforms=mma),
                plgpu.BlockSpec((block_t, half), lambda j: (block(j), 1 - v), transforms=mma),
                plgpu.BlockSpec((block_t, r), lambda j: (block(j), 0), transforms=mma),
            ],
            max_concurrent_steps=2,
            init_carry=init,
        )(ckv_gmem.at[layer_i, row], ckv_gmem.at[layer_i, row], kr_gmem.at[layer_i, row])

    acc, m, l = pl.run_scoped(
        compute,
        plgpu.SMEM((_GPU_HEADS, half), dtype, transforms=mma),
        plgpu.SMEM((_GPU_HEADS, half), dtype, transforms=mma),
        plgpu.SMEM((_GPU_HEADS, r), dtype, transforms=mma),
        plgpu.Barrier(num_barriers=3),
    )
    # Staged after the pipeline's scope closes, so it reuses that SMEM.
    _gpu_store(acc, m, l, o_gmem.at[bi, split, heads, pl.ds(v * half, half)], lse_gmem.at[bi, split, heads], half)


def _decode_gpu(q_lat, q_rope, ckv, krope, lengths, layer, *, scale, block_t, num_splits, block_tables=None):
    """The Hopper kernel over a dense stack ckv [L,B,T,C] / krope [L,B,T,R], or, with block_tables [B,N], over
    page pools [L,P,page,C] / [L,P,page,R] (page a multiple of block_t): row b's logical block j is then
    block j % k of page block_tables[b, j // k], k = page // block_t. Returns (o_lat [B,H,C], lse [B,H])."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # Hopper-only lowering

    b, h, c = q_lat.shape
    hp = pl.cdiv(h, _GPU_HEADS) * _GPU_HEADS
    q_lat = jnp.pad(q_lat, ((0, 0), (0, hp - h), (0, 0)))
    q_rope = jnp.pad(q_rope, ((0, 0), (0, hp - h), (0, 0)))
    if block_tables is None:
        n_blocks, tables = ckv.shape[2] // block_t, ()
    else:
        per_page = ckv.shape[2] // block_t
        n_blocks, tables = block_tables.shape[1] * per_page, (block_tables,)
        # Each layer's pool as one row of P·page tokens (a free reshape): a page is then just a block address.
        ckv, krope = (a.reshape(a.shape[0], 1, -1, a.shape[-1]) for a in (ckv, krope))
    static = dict(scale=scale, block_t=block_t, blocks_per_split=pl.cdiv(n_blocks, num_splits), n_blocks=n_blocks,
                  dtype=q_lat.dtype)

    def body(len_gmem, layer_gmem, *refs):  # a named function: Mosaic GPU names the kernel after it
        if block_tables is None:
            return _gpu_body(len_gmem, layer_gmem, *refs, cache_row=lambda bi: bi, cache_block=lambda bi, j: j,
                             **static)
        bt_gmem, *refs = refs

        def page_block(bi, j):
            # Clamped to the row's last valid block (an empty split's one masked step must not follow a table
            # slot past the length, which may hold anything).
            j = jnp.minimum(j, jnp.maximum(pl.cdiv(len_gmem[bi], block_t) - 1, 0))
            return bt_gmem[bi, j // per_page] * per_page + j % per_page

        _gpu_body(len_gmem, layer_gmem, *refs, cache_row=lambda bi: 0, cache_block=page_block, **static)

    f32 = jnp.float32
    o_part, lse_part = plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct((b, num_splits, hp, c), f32), jax.ShapeDtypeStruct((b, num_splits, hp), f32)],
        grid=(hp // _GPU_HEADS, _GPU_SPLIT_V, num_splits, b),
        grid_names=("hb", "v", "s", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, layer, *tables, q_lat, q_rope, ckv, krope)
    o, lse = combine_splits(o_part, lse_part, q_lat.dtype)
    return o[:, :h], lse[:, :h]


def gpu_num_splits(batch: int, heads: int) -> int:
    """Split-K count that fills an H100/H200's 132 SMs with (row, head tile, value half, split) CTAs."""
    return pl.cdiv(132, batch * pl.cdiv(heads, _GPU_HEADS) * _GPU_SPLIT_V)


def _default_block(backend: str) -> int:
    return {"mosaic_tpu": 128}.get(backend, 64)


def decode_supported(backend: str, q_dtype, cache_dtype, max_len: int, block_t: int | None = None) -> bool:
    """Whether `backend` decodes this query / cache: the Hopper kernel (WGMMA, no tail masking of partial
    blocks) needs one 16-bit dtype for both and a cache of whole blocks; the others take anything."""
    if backend != "mosaic_gpu":
        return True
    return (jnp.dtype(q_dtype) == jnp.dtype(cache_dtype) and jnp.dtype(q_dtype) in (jnp.bfloat16, jnp.float16)
            and max_len % (block_t or _default_block(backend)) == 0)


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "num_splits", "backend"))
def mla_decode(q_lat, q_rope, ckv, krope, lengths, *, scale, layer=None, block_t=None, num_splits=None, backend="auto"):
    """Absorbed-MLA decode attention over the latent cache.

    q_lat [B,H,C], q_rope [B,H,R], ckv [B,T,C], krope [B,T,R], lengths [B] int32
    (1 <= length <= T; entries at positions >= length are ignored).
    With `layer` (an int32 scalar, may be traced) ckv/krope are a whole layer stack [L,B,T,C] / [L,B,T,R]
    and the kernel reads layer `layer` in place, so a decode step scanning over layers copies no cache.
    Returns (o_lat [B,H,C] in q dtype, lse [B,H] fp32).
    block_t: cache rows per block. num_splits: T-splits (split-K); None picks
    enough to fill the device. backend: "auto" | "interpret" | "mosaic_tpu" |
    "mosaic_gpu" | "xla" (pure-JAX reference); "mosaic_gpu" raises ValueError for
    a cache `decode_supported` rejects.
    """
    backend = resolve_backend(backend)
    if layer is None:
        ckv, krope, layer = ckv[None], krope[None], 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    t = ckv.shape[2]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)
    block_t = block_t or _default_block(backend)
    if not decode_supported(backend, q_lat.dtype, ckv.dtype, t, block_t):
        raise ValueError(f"mla_decode backend {backend!r} needs q and cache in one 16-bit dtype and whole "
                         f"{block_t}-row blocks, got {q_lat.dtype} / {ckv.dtype} with {t} rows "
                         "(dsv2_jax.ops.attention_backend decodes these with 'xla')")
    if backend == "xla":
        pick = lambda a: lax.dynamic_index_in_dim(a, layer[0], 0, keepdims=False)
        return mla_decode_reference(q_lat, q_rope, pick(ckv), pick(krope), lengths, scale=scale)
    n_blocks = pl.cdiv(t, block_t)
    if num_splits is None:
        # Enough (batch, split) programs to fill the chip: the SMs of an H100/H200, 2 TensorCores on megacore TPUs.
        num_splits = (gpu_num_splits(*q_lat.shape[:2]) if backend == "mosaic_gpu"
                      else pl.cdiv({"mosaic_tpu": 2}.get(backend, 1), q_lat.shape[0]))
    num_splits = max(1, min(num_splits, n_blocks))
    kernel = _decode_gpu if backend == "mosaic_gpu" else functools.partial(
        _decode_pallas, interpret=backend == "interpret")
    return kernel(q_lat, q_rope, ckv, krope, lengths, layer, scale=scale, block_t=block_t, num_splits=num_splits)
