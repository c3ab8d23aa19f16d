"""The attention call, and which implementation runs it.

`config.model.attention`: 'auto' picks cuDNN's fused kernel on a GPU for 16-bit causal attention
(training, evaluation) when this GPU's cuDNN lowers it; on the CPU our own two-einsum version
('einsum': faster there than XLA's `jax.nn.dot_product_attention`, and for one decode query a
multiply-and-sum that reads the cache in place); XLA's `jax.nn.dot_product_attention` elsewhere
(TPU, GPU in float32, the masked decode step on a GPU). 'xla', 'cudnn' or 'einsum' force one.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rag_jax.models import switch


def attend(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS=None, impl: str = 'xla') -> jax.Array:
  """Attention of queries over keys and values of the same heads: causal over positions 0..L-1
  when `mask_LxS` is None. The softmax is float32 in every implementation. The output is one of
  the residuals a switch branch keeps (`switch.save`; cuDNN's fused kernel keeps its outputs
  by switch's policy, so naming them would store them twice)."""
  if impl == 'einsum':
    return switch.save(_einsum_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS))
  o_BxLxhxK = jax.nn.dot_product_attention(
      q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask=None if mask_LxS is None else mask_LxS[None, None],
      is_causal=mask_LxS is None, implementation=impl)
  return o_BxLxhxK if impl == 'cudnn' else switch.save(o_BxLxhxK)


def attend_step(q_Bx1xhxK, k_BxSxhxK, v_BxSxhxK, mask_S, k_Bx1xhxK, v_Bx1xhxK) -> jax.Array:
  """One query over the cache positions `mask_S` allows and its own key and value, which the
  cache does not hold: softmax over the S + 1 scores in float32, as `attend` over the updated
  cache (the same function up to float rounding). Products and sums, reading the cache in place
  (see _einsum_attention)."""
  f32 = jnp.float32
  q_Bx1xhxK = q_Bx1xhxK.astype(f32) * (1 / math.sqrt(q_Bx1xhxK.shape[-1]))
  s_BxSxh = jnp.sum(q_Bx1xhxK * k_BxSxhxK.astype(f32), axis=-1)
  s_BxSxh = jnp.where(mask_S[None, :, None], s_BxSxh, jnp.finfo(f32).min)
  s_Bx1xh = jnp.sum(q_Bx1xhxK * k_Bx1xhxK.astype(f32), axis=-1)
  m_Bx1xh = jnp.maximum(jnp.max(s_BxSxh, axis=1, keepdims=True), s_Bx1xh)
  p_BxSxh, p_Bx1xh = jnp.exp(s_BxSxh - m_Bx1xh), jnp.exp(s_Bx1xh - m_Bx1xh)
  o_Bxhxk = (jnp.sum(p_BxSxh[..., None] * v_BxSxhxK.astype(f32), axis=1)
             + p_Bx1xh[:, 0, :, None] * v_Bx1xhxK[:, 0].astype(f32))
  o_Bxhxk = o_Bxhxk / (jnp.sum(p_BxSxh, axis=1) + p_Bx1xh[:, 0])[..., None]
  return switch.save(o_Bxhxk[:, None].astype(v_BxSxhxK.dtype))


def _einsum_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS=None) -> jax.Array:
  """softmax(q k^T / sqrt(K) + mask) v in two einsums, scores and softmax in float32.

  One query (a decode step) takes products and sums instead: a dot over the cache's
  B x S x h x K layout made XLA:CPU copy the whole cache into a head-major layout at every step
  (a quarter of a decode step of the :gpu model); a multiply-and-reduce reads it in place."""
  L, S, K = q_BxLxhxK.shape[1], k_BxSxhxK.shape[1], q_BxLxhxK.shape[-1]
  if mask_LxS is None:
    mask_LxS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None]
  if L == 1:
    # The float32 casts fuse into the multiply-and-reduce loops: a 16-bit cache is read as it
    # lies, not copied to float32.
    q_Bx1xhxK = q_BxLxhxK.astype(jnp.float32) * (1 / math.sqrt(K))
    s_BxSxh = jnp.sum(q_Bx1xhxK * k_BxSxhxK.astype(jnp.float32), axis=-1)
    s_BxSxh = jnp.where(mask_LxS[0][None, :, None], s_BxSxh, jnp.finfo(jnp.float32).min)
    p_BxSxh = jax.nn.softmax(s_BxSxh, axis=1)
    o_Bxhxk = jnp.sum(p_BxSxh[..., None] * v_BxSxhxK.astype(jnp.float32), axis=1)
    return o_Bxhxk[:, None].astype(v_BxSxhxK.dtype)
  s_BxhxLxS = jnp.einsum('BLHK,BSHK->BHLS', q_BxLxhxK, k_BxSxhxK,
                         preferred_element_type=jnp.float32) * (1 / math.sqrt(K))
  s_BxhxLxS = jnp.where(mask_LxS, s_BxhxLxS, jnp.finfo(jnp.float32).min)
  p_BxhxLxS = jax.nn.softmax(s_BxhxLxS, axis=-1).astype(v_BxSxhxK.dtype)
  return jnp.einsum('BHLS,BSHK->BLHK', p_BxhxLxS, v_BxSxhxK)


def implementation(choice: str, head_dim: int, dtype, causal: bool) -> str:
  """The implementation for a call: `choice` unless it is 'auto' (see the module docstring)."""
  if choice != 'auto':
    return choice
  ok = (jax.default_backend() == 'gpu' and causal and head_dim % 8 == 0 and head_dim <= 128
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and _cudnn_lowers(head_dim, jnp.dtype(dtype).name))
  if ok:
    return 'cudnn'
  return 'einsum' if jax.default_backend() == 'cpu' else 'xla'


@functools.cache
def _cudnn_lowers(head_dim: int, dtype: str) -> bool:
  """Whether this GPU's cuDNN takes causal attention of this head width (a lowering, not a run)."""
  q = jax.ShapeDtypeStruct((1, 128, 1, head_dim), jnp.dtype(dtype))
  try:
    jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                              implementation='cudnn')).lower(q, q, q)
    return True
  except Exception:  # pylint: disable=broad-except
    return False
