"""The attention call, and which implementation runs it.

`config.model.attention`: 'auto' picks cuDNN's fused kernel on a GPU for 16-bit causal attention
(training, evaluation) when this GPU's cuDNN lowers it; on the CPU our own two-einsum version
('einsum': faster there than XLA's `jax.nn.dot_product_attention`, and for one decode query
two dot products over the cache as it lies); XLA's `jax.nn.dot_product_attention` elsewhere
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
  cache (the same function up to float rounding); the cache's part as in _one_query."""
  q_Bx1xhxK = _scaled(q_Bx1xhxK)
  s_BxhxS = _cache_scores(q_Bx1xhxK, k_BxSxhxK, mask_S)
  s_Bxhx1 = jnp.sum(q_Bx1xhxK[:, 0] * k_Bx1xhxK[:, 0].astype(jnp.float32), axis=-1)[..., None]
  m_Bxhx1 = jnp.maximum(jnp.max(s_BxhxS, axis=-1, keepdims=True), s_Bxhx1)
  p_BxhxS, p_Bxhx1 = jnp.exp(s_BxhxS - m_Bxhx1), jnp.exp(s_Bxhx1 - m_Bxhx1)
  o_BxhxK = (_cache_values(p_BxhxS, v_BxSxhxK) + p_Bxhx1 * v_Bx1xhxK[:, 0].astype(jnp.float32))
  o_BxhxK = o_BxhxK / (jnp.sum(p_BxhxS, axis=-1, keepdims=True) + p_Bxhx1)
  return switch.save(o_BxhxK[:, None].astype(v_BxSxhxK.dtype))


def _einsum_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS=None) -> jax.Array:
  """softmax(q k^T / sqrt(K) + mask) v in two einsums, scores and softmax in float32.

  One query (a decode step): _one_query."""
  L, S, K = q_BxLxhxK.shape[1], k_BxSxhxK.shape[1], q_BxLxhxK.shape[-1]
  if mask_LxS is None:
    mask_LxS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None]
  if L == 1:
    return _one_query(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS[0])
  s_BxhxLxS = jnp.einsum('BLHK,BSHK->BHLS', q_BxLxhxK, k_BxSxhxK,
                         preferred_element_type=jnp.float32) * (1 / math.sqrt(K))
  s_BxhxLxS = jnp.where(mask_LxS, s_BxhxLxS, jnp.finfo(jnp.float32).min)
  p_BxhxLxS = jax.nn.softmax(s_BxhxLxS, axis=-1).astype(v_BxSxhxK.dtype)
  return jnp.einsum('BHLS,BSHK->BLHK', p_BxhxLxS, v_BxSxhxK)


def _one_query(q_Bx1xhxK, k_BxSxhxK, v_BxSxhxK, mask_S) -> jax.Array:
  """One query per row over the cache as it lies (B x S x h x K), float32 scores and softmax:
  two dot products batched over rows and heads. Against a multiply-and-reduce over the same
  layout (an earlier version, chosen when a dot made XLA:CPU copy the cache into a head-major
  layout), these ran within 7% of it at one row of a short cache, 2.1x faster at one row of
  the :gpu model's cache and 2.0-2.2x at 4-16 rows; the engine's step at 16 slots of the
  default model took 0.79x the time (experiments/attention_step.py)."""
  p_BxhxS = jax.nn.softmax(_cache_scores(_scaled(q_Bx1xhxK), k_BxSxhxK, mask_S), axis=-1)
  return _cache_values(p_BxhxS, v_BxSxhxK)[:, None].astype(v_BxSxhxK.dtype)


def _scaled(q_Bx1xhxK) -> jax.Array:
  """The query / sqrt(K), float32."""
  return q_Bx1xhxK.astype(jnp.float32) * (1 / math.sqrt(q_Bx1xhxK.shape[-1]))


def _cache_scores(qs_Bx1xhxK, k_BxSxhxK, mask_S) -> jax.Array:
  """The scaled query's (`_scaled`) dot with each key over the cache positions `mask_S` allows
  (float32 B x h x S; the dot in the cache's dtype, accumulated in float32, as the prefill's)."""
  s_BxhxS = jnp.einsum('BQHK,BSHK->BHS', qs_Bx1xhxK.astype(k_BxSxhxK.dtype), k_BxSxhxK,
                       preferred_element_type=jnp.float32)
  return jnp.where(mask_S[None, None, :], s_BxhxS, jnp.finfo(jnp.float32).min)


def _cache_values(p_BxhxS, v_BxSxhxK) -> jax.Array:
  """The probabilities' weighted sum of the cache's values (float32 B x h x K)."""
  return jnp.einsum('BHS,BSHK->BHK', p_BxhxS.astype(v_BxSxhxK.dtype), v_BxSxhxK,
                    preferred_element_type=jnp.float32)


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
