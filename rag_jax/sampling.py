"""How a token is chosen from logits: greedy, or a draw from the softmax at a temperature,
restricted to the top k tokens and to the nucleus of mass p. The compiled sampler
(rag_jax/sample.py) and speculative decoding (rag_jax/speculative.py) share these rules, so
that the speculative acceptance test targets exactly the distribution plain sampling draws from.
`confidence` is what the `adaptive` policy escalates on (in generation and in evaluate).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def processed_logits(logits_BxV: jax.Array, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> jax.Array:
  """float32 logits / temperature, -inf outside the top k and outside the nucleus (the
  smallest set of most likely tokens whose probability reaches p)."""
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # Keep a token while the mass of the more likely ones is still below p.
    keep = mass_before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def check(temperature: float, top_k: int, top_p: float, greedy: bool) -> None:
  """One ValueError naming a bad sampling setting."""
  if not greedy and not temperature > 0:
    raise ValueError(f'temperature must be > 0 (or use greedy), got {temperature!r}.')
  if not (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)
          and 0 <= top_k < 2**31):
    raise ValueError(f'top_k must be an integer >= 0 (0: all tokens), got {top_k!r}.')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p!r}.')


def sample_token(logits_BxV: jax.Array, key: jax.Array, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> jax.Array:
  """One token per row: greedy, or a draw from `processed_logits`."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(
      key, processed_logits(logits_BxV, temperature, top_k, top_p)).astype(jnp.int32)


def confidence(logits: jax.Array) -> jax.Array:
  """The top-1 probability of the model's own distribution (float32 softmax at temperature 1,
  whatever the sampling settings), over the last axis."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).max(-1)


def sample_row(logits_V: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
               top_p: jax.Array, greedy: jax.Array) -> jax.Array:
  """One token from one row's logits with that row's own settings as arrays (a decode slot's:
  rows of one step may differ). The same token `sample_token` draws with the same settings as
  static values: greedy; top_k 0 keeps all tokens, top_p 1 the whole mass."""
  logits_V = logits_V.astype(jnp.float32)
  scaled_V = logits_V / jnp.where(greedy, 1.0, temperature)
  sorted_V = jnp.sort(scaled_V)[::-1]
  kth = sorted_V[jnp.clip(top_k - 1, 0, logits_V.shape[-1] - 1)]
  scaled_V = jnp.where((top_k > 0) & (scaled_V < kth), -jnp.inf, scaled_V)
  sorted_V = jnp.where((top_k > 0) & (sorted_V < kth), -jnp.inf, sorted_V)
  probs_V = jax.nn.softmax(sorted_V)
  keep_V = jnp.cumsum(probs_V) - probs_V < top_p
  threshold = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf))
  scaled_V = jnp.where((top_p < 1.0) & (scaled_V < threshold), -jnp.inf, scaled_V)
  drawn = jax.random.categorical(key, scaled_V).astype(jnp.int32)
  return jnp.where(greedy, jnp.argmax(logits_V).astype(jnp.int32), drawn)


def sample_rows(logits_SxV: jax.Array, keys_S: jax.Array, temperature_S: jax.Array,
                top_k_S: jax.Array, top_p_S: jax.Array, greedy_S: jax.Array) -> jax.Array:
  """`sample_row` over rows of their own settings. The sort that top-k and top-p need runs only
  when some row asks for one (a sort of the vocabulary costs more than a small model's step),
  and no random draw runs when every row is greedy."""
  def truncated():
    return jax.vmap(sample_row)(logits_SxV, keys_S, temperature_S, top_k_S, top_p_S, greedy_S)

  def whole():
    logits_SxV_ = logits_SxV.astype(jnp.float32)
    scaled = logits_SxV_ / jnp.where(greedy_S, 1.0, temperature_S)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys_S, scaled).astype(jnp.int32)
    return jnp.where(greedy_S, jnp.argmax(logits_SxV_, -1).astype(jnp.int32), drawn)

  def greedy():
    return jnp.argmax(logits_SxV, -1).astype(jnp.int32)

  return jax.lax.cond(jnp.all(greedy_S), greedy, lambda: jax.lax.cond(
      jnp.any((top_k_S > 0) | (top_p_S < 1.0)), truncated, whole))
