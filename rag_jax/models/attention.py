"""The attention call, and which implementation of `jax.nn.dot_product_attention` runs it.

`config.model.attention`: 'auto' picks cuDNN's fused kernel on a GPU for 16-bit causal attention
(training, evaluation) when this GPU's cuDNN lowers it, and XLA's implementation otherwise (CPU,
TPU, float32, the masked decode step); 'xla' or 'cudnn' force one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def attend(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS=None, impl: str = 'xla') -> jax.Array:
  """Attention of queries over keys and values of the same heads: causal over positions 0..L-1
  when `mask_LxS` is None. The softmax is float32 in both implementations."""
  if mask_LxS is None:
    return jax.nn.dot_product_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, is_causal=True,
                                        implementation=impl)
  return jax.nn.dot_product_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask=mask_LxS[None, None],
                                      implementation=impl)


def implementation(choice: str, head_dim: int, dtype, causal: bool) -> str:
  """The implementation for a call: `choice` unless it is 'auto' (see the module docstring)."""
  if choice != 'auto':
    return choice
  ok = (jax.default_backend() == 'gpu' and causal and head_dim % 8 == 0 and head_dim <= 128
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and _cudnn_lowers(head_dim, jnp.dtype(dtype).name))
  return 'cudnn' if ok else 'xla'


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
