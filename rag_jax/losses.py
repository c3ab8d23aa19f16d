"""The next-token cross-entropy, in one place (training, evaluation, importance reordering)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Cross-entropy of each position's prediction against its target token, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                         targets_BxT)
