"""The one place that decides how attention runs: (config.attention_impl, platform, phase) → attention core.

| attention_impl | platform | train / prefill (causal, packed)              | decode (absorbed, latent cache)        |
|----------------|----------|-----------------------------------------------|----------------------------------------|
| xla            | any      | `xla`: scores on the split nope/rope dims     | `xla`: kernels_pallas reference        |
| auto           | cpu      | `xla`                                         | `xla`                                  |
| auto / pallas  | tpu      | `mosaic_tpu`: kernels_pallas.flash_mla        | `mosaic_tpu`: kernels_pallas.mla_decode |
| auto / pallas  | gpu      | `tokamax_gpu`: tokamax Mosaic GPU flash       | `mosaic_gpu`: kernels_pallas.mla_decode |
| pallas         | cpu      | `interpret`: kernels_pallas.flash_mla         | `interpret`: kernels_pallas.mla_decode  |

Decode over the paged serving cache (`paged_decode_attention`) uses `kernels_pallas.paged_mla_decode` with the same
choice (its Hopper variant is the same kernel reading pages through the block table). The caches
(infer/latent_cache.py, serve/paged_cache.py) call the decode cores with their own layout and layer index.

The Hopper decode kernel needs query and cache in one 16-bit dtype and a cache length (paged: a page size) of whole
blocks; other caches decode with `xla` (`decode_kernel`). Under a mesh context (`jax.set_mesh` /
`use_abstract_mesh`) the Pallas and tokamax cores run inside `shard_map` (batch over the batch axes, heads over
"tensor"), because XLA cannot partition a kernel's custom call and would otherwise gather its operands onto every
device.

The platform is JAX's default backend unless the context mesh names a target device (an `AbstractMesh` with an
`abstract_device`) or `lowering_platform("tpu" | "cuda")` names it, so `jax.export(..., platforms=[...])` on a
CPU host traces the target's kernels (tests/test_lowering.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv2_jax.parallel.sharding import BATCH_AXES, LOGICAL_RULES
import kernels_pallas
from kernels_pallas.mla_decode import decode_supported
from kernels_pallas.paged_mla_decode import paged_mla_decode
from kernels_pallas.reference import attention_mask, masked_softmax

IMPLS = ("auto", "xla", "pallas")
PHASES = ("train", "prefill", "decode")
_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_lowering_platform", default=None)


@contextlib.contextmanager
def lowering_platform(platform: str):
    """Trace attention for `platform` ("cpu" | "cuda" | "gpu" | "tpu") whatever this host runs, as needed to
    jax.export for another platform. GPU: also lets tokamax build its kernels away from a GPU."""
    if platform not in _PLATFORMS:
        raise ValueError(f"lowering platform must be one of {sorted(_PLATFORMS)}, got {platform!r}")
    token = _target.set(_PLATFORMS[platform])
    try:
        if _PLATFORMS[platform] == "gpu":
            import tokamax
            with tokamax.config.cross_compile(True):
                yield
        else:
            yield
    finally:
        _target.reset(token)


def current_platform() -> str:
    """"cpu" | "gpu" | "tpu": `lowering_platform`'s, else the context mesh's device (an AbstractMesh naming a
    target device, as Pallas TPU lowering also reads it), else JAX's default backend. Other JAX platforms count
    as "cpu": they get the XLA cores."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = _target.get() or (device.platform if device is not None else jax.default_backend())
    return _PLATFORMS.get(platform, "cpu")


def select(impl: str, platform: str, phase: str) -> str:
    """Name of the attention core for this choice: xla | interpret | mosaic_tpu | mosaic_gpu | tokamax_gpu."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if phase not in PHASES:
        raise ValueError(f"attention phase must be one of {PHASES}, got {phase!r}")
    if impl == "xla" or (impl == "auto" and platform == "cpu"):
        return "xla"
    if platform == "cpu":
        return "interpret"
    if platform == "gpu" and phase != "decode":
        return "tokamax_gpu"
    return kernels_pallas.default_backend(platform)


# ---- train / prefill: causal self-attention on decompressed K/V -------------------------------------------
def xla_attention(q_nope, q_rope, k_nope, k_rope, v, mask, scale) -> jnp.ndarray:
    """Plain XLA attention. q_nope [B,T,H,n], q_rope [B,T,H,r], k_nope [B,S,H,n], k_rope [B,S,r] (shared by
    the heads), v [B,S,H,dv], mask [B|1,1|H,T,S] → [B,T,H,dv] in v's dtype.

    One score contraction over the concatenated n+r dims, k_rope broadcast to the heads as the kernels take it
    (K grows by r/(n+dv) of K+V): a separate head-shared rope product costs a second batched GEMM, a sum of two
    [B,H,T,S] score tensors and, in the backward, transposes of them — the tiny model's attention fwd+bwd ran
    ~1.7x slower on CPU that way."""
    q, k = _kernel_qk(q_nope, q_rope, k_nope, k_rope)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    probs = masked_softmax(scores * scale, mask).astype(v.dtype)
    return jnp.einsum("bhts,bshv->bthv", probs, v)


def _kernel_qk(q_nope, q_rope, k_nope, k_rope):
    """The kernels' [B,T,H,n+r] q and k: k_rope is shared by all heads, so it is broadcast here."""
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])
    return jnp.concatenate([q_nope, q_rope], axis=-1), jnp.concatenate([k_nope, k_rope], axis=-1)


def segment_starts(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[B,T] int32: index of the first token of each token's run of equal segment ids. With causality this
    is exactly the equal-id mask when every segment is one contiguous run, as packing produces."""
    t = segment_ids.shape[1]
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new, jnp.arange(t, dtype=jnp.int32), 0), axis=1)


def tokamax_attention(q, k, v, segment_ids, scale, implementation: str = "mosaic_gpu") -> jnp.ndarray:
    """Causal flash attention through tokamax (q, k [B,T,H,Dqk], v [B,T,H,Dv]; Dv != Dqk is fine): packed
    segments become per-query key ranges (k_start), so no [T,T] mask exists. implementation: a tokamax
    attention implementation ("mosaic_gpu" here; "xla" checks this wrapper on CPU)."""
    from tokamax._src.ops.attention import api, base  # Mask with k_start is not re-exported publicly

    k_start = None if segment_ids is None else segment_starts(segment_ids)[:, None, :]  # [B,1(heads),T]
    op = api.IMPLEMENTATIONS[implementation]
    return op(q, k, v, mask=base.Mask(is_causal=True, k_start=k_start), logits_scale=scale)


def _sharded(core: Callable, specs: tuple, out_spec: P) -> Callable:
    """Run `core` per device over the context mesh, if there is one (see module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return core
    return jax.shard_map(core, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)


def _axes(mesh, names, dim: int):
    """The mesh axes among `names` that split a dimension of size `dim` (None when they do not divide it)."""
    names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
    return names if names and dim % math.prod(mesh.shape[n] for n in names) == 0 else None


def _specs(batch: int, heads: int) -> tuple:
    """Mesh axes splitting the kernels' batch and heads dimensions (the parameters' heads rule)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    return _axes(mesh, BATCH_AXES, batch), _axes(mesh, (LOGICAL_RULES["heads"],), heads)


def sequence_attention(impl: str, phase: str, q_nope, q_rope, k_nope, k_rope, v, segment_ids, scale):
    """Causal (packed: within equal segment ids) self-attention. Shapes as `xla_attention`, segment_ids
    [B,T] int32 or None → [B,T,H,dv]."""
    kernel = select(impl, current_platform(), phase)
    if kernel == "xla":
        return xla_attention(q_nope, q_rope, k_nope, k_rope, v, attention_mask(q_nope.shape[1], segment_ids),
                             scale)
    if segment_ids is None:
        segment_ids = jnp.zeros(q_nope.shape[:2], jnp.int32)
    if kernel == "tokamax_gpu":
        core = lambda q, k, v, seg: tokamax_attention(q, k, v, seg, scale)
    else:
        core = lambda q, k, v, seg: kernels_pallas.flash_mla_attention(q, k, v, scale=scale, segment_ids=seg,
                                                                         causal=True, backend=kernel)
    b, h = _specs(q_nope.shape[0], q_nope.shape[2])
    qkv, seg = P(b, None, h, None), P(b, None)
    return _sharded(core, (qkv, qkv, qkv, seg), qkv)(*_kernel_qk(q_nope, q_rope, k_nope, k_rope), v, segment_ids)


# ---- decode: absorbed single-token attention over a latent cache (the cache supplies its layer index) -------
def decode_kernel(impl: str, platform: str, q_dtype, cache_dtype, max_len: int) -> str:
    """The decode core for this cache: `select`'s choice, or xla where the kernel cannot take the cache."""
    kernel = select(impl, platform, "decode")
    return kernel if decode_supported(kernel, q_dtype, cache_dtype, max_len) else "xla"


def decode_attention(impl: str, q_lat, q_rope, ckv, krope, lengths, *, scale, layer) -> jnp.ndarray:
    """Absorbed attention of one query token per row over layer `layer` of a stacked latent cache.

    q_lat [B,H,C] (W_UK folded in), q_rope [B,H,R], ckv [L,B,S,C], krope [L,B,S,R]; row b attends to cache
    positions < lengths[b] (>= 1). Returns o_lat [B,H,C] in q_lat's dtype (the caller applies W_UV).
    """
    kernel = decode_kernel(impl, current_platform(), q_lat.dtype, ckv.dtype, ckv.shape[2])
    core = lambda q_lat, q_rope, ckv, krope, lengths, layer: kernels_pallas.mla_decode(
        q_lat, q_rope, ckv, krope, lengths, scale=scale, layer=layer, backend=kernel)[0]
    if kernel == "xla":
        return core(q_lat, q_rope, ckv, krope, lengths, layer)
    b, h = _specs(q_lat.shape[0], q_lat.shape[1])
    q, cache = P(b, h, None), P(None, b, None, None)
    return _sharded(core, (q, q, cache, cache, P(b), P()), q)(q_lat, q_rope, ckv, krope, lengths,
                                                               jnp.asarray(layer, jnp.int32))


def paged_decode_attention(impl: str, q_lat, q_rope, ckv, krope, block_tables, lengths, *, scale, layer):
    """`decode_attention` over a paged pool: ckv [L,P,page,C], krope [L,P,page,R], block_tables [B,N] page ids
    of each row; row b attends to its positions < lengths[b]. Returns o_lat [B,H,C] in q_lat's dtype."""
    kernel = decode_kernel(impl, current_platform(), q_lat.dtype, ckv.dtype, ckv.shape[2])  # page size as length
    return paged_mla_decode(q_lat, q_rope, ckv, krope, block_tables, lengths, scale=scale, layer=layer,
                            backend=kernel)[0]
