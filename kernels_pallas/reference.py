"""Pure-JAX references for the MLA kernels, plus the online-softmax step they share.

The references materialise full score matrices in fp32; they are the ground
truth for tests and the `backend="xla"` path.
"""

import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row then yields exp(0)=1 garbage that
# the next valid block wipes out via alpha=exp(MASK-m)=0, instead of NaN from
# (-inf) - (-inf).
MASK_VALUE = -1e30


def online_softmax_update(s, m_prev, l_prev, acc_prev, v):
    """One flash step: fold scores s [M,N] (fp32, already masked) and values v [N,D].

    m_prev/l_prev are [M,1] running max / denominator, acc_prev [M,D] fp32.
    Returns the updated (m, l, acc). p is cast to v's dtype so the PV matmul runs
    at the input precision (bf16 MXU/tensor-core path) with fp32 accumulation.
    """
    m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv


def attention_mask(length, segment_ids=None, causal=True):
    """[B|1, 1, T, T] bool: key visible to query (causal, and equal segment ids for packed rows)."""
    idx = jnp.arange(length)
    mask = (idx[:, None] >= idx[None, :] if causal else jnp.ones((length, length), bool))[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def masked_softmax(scores, mask):
    """softmax over the last axis of fp32 scores where mask holds (masked entries get MASK_VALUE)."""
    return jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)


def mla_decode_reference(q_lat, q_rope, ckv, krope, lengths, *, scale):
    """Absorbed-MLA decode: one query token per sequence over the latent cache.

    q_lat [B,H,C], q_rope [B,H,R], ckv [B,T,C], krope [B,T,R], lengths [B] int32 (>= 1).
    Returns o_lat [B,H,C] (q dtype) and lse [B,H] fp32. The probabilities meet the cache at the wider of the
    query and cache dtypes with fp32 accumulation: a 16-bit cache is read as is (as the kernels do), never
    upcast, while an fp32 model keeps fp32 probabilities over a bf16 cache.
    """
    f32 = jnp.float32
    s = jnp.einsum("bhc,btc->bht", q_lat, ckv, preferred_element_type=f32) + jnp.einsum(
        "bhr,btr->bht", q_rope, krope, preferred_element_type=f32
    )
    s = s * scale
    valid = jnp.arange(ckv.shape[1])[None, None, :] < lengths[:, None, None]
    s = jnp.where(valid, s, MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    dtype = jnp.promote_types(q_lat.dtype, ckv.dtype)
    o = jnp.einsum("bht,btc->bhc", p.astype(dtype), ckv.astype(dtype), preferred_element_type=f32)
    return o.astype(q_lat.dtype), lse


def mla_attention_reference(q, k, v, *, scale, segment_ids=None, causal=True):
    """Multi-head attention with qk dim != v dim. q,k [B,T,H,Dqk], v [B,T,H,Dv].

    segment_ids [B,T] int32 restricts attention to equal ids (packed sequences).
    """
    f32 = jnp.float32
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) * scale
    p = masked_softmax(s, attention_mask(q.shape[1], segment_ids, causal))
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(f32))
    return o.astype(q.dtype)
