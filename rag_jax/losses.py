"""The next-token cross-entropy and the gain of one width over another, in one place (training,
evaluation, importance reordering, the router)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Cross-entropy of each position's prediction against its target token, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                         targets_BxT)


def expected_gain(full_logits: jax.Array, narrow_logits: jax.Array) -> jax.Array:
  """KL(p_full || p_narrow) per position: the gain of the full width over the narrow one that
  the context alone can tell, the expected `loss_narrow - loss_full` when the next token is
  drawn from the full model. The target the router learns (the realised gain also depends on
  the next token, which no causal router sees)."""
  full = jax.nn.log_softmax(full_logits.astype(jnp.float32), axis=-1)
  narrow = jax.nn.log_softmax(narrow_logits.astype(jnp.float32), axis=-1)
  return (jnp.exp(full) * (full - narrow)).sum(-1)
