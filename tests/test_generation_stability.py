"""experiments/generation_stability.py's measures: distinct-n and the strided full-model score."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rag_jax import configuration
from rag_jax.models import gpt
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / 'experiments'))
stability = configuration.load_module(str(ROOT / 'experiments' / 'generation_stability.py'))

CFG = gpt.GPTConfig(vocab_size=11, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32,
                    block_size=8)


def test_distinct_n():
  assert stability.distinct(np.array([1, 2, 1, 2, 1, 2]), 2) == 2 / 5  # (1,2), (2,1) only
  assert stability.distinct(np.arange(9), 3) == 1.0
  assert stability.distinct(np.zeros(9, np.int32), 1) == 1 / 9


@pytest.mark.slow
def test_strided_score_sees_half_a_context_and_scores_every_token_once():
  """Within one context the score is one forward pass; beyond it, token t is scored by the
  first window [s, s + T] (s = k * T/2, the last one ending at the text's end) that holds it,
  so it sees >= T/2 tokens: checked against that rule written out here token by token."""
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  score = stability.make_scorer(model, params, CFG.block_size)
  rng = np.random.default_rng(0)
  T, h = CFG.block_size, CFG.block_size // 2

  @jax.jit
  def logits_of(window_T):  # causal: padding after the context changes nothing before it
    return model.apply({'params': params}, window_T[None])[0][0]

  def nll(window, target):  # the NLL of window's token `target` given those before it
    padded = np.zeros(T, np.int32)
    padded[:target] = window[:target]
    logits = logits_of(jnp.asarray(padded))[target - 1]
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, window[target]))

  assert T == 8
  # The windows' starts, by hand: every h = 4 tokens, the last one ending at the text's end.
  hand = {7: [0], 9: [0], 30: [0, 4, 8, 12, 16, 20, 21], 31: [0, 4, 8, 12, 16, 20, 22]}
  for N, first in ((7, 3), (9, 2), (30, 5), (31, 3)):
    tokens = rng.integers(0, CFG.vocab_size, (2, N)).astype(np.int32)
    starts = hand[N]
    want = []
    for row in tokens:
      per_token = []
      for t in range(first, N):
        s = next(s for s in starts if t <= s + T)
        assert t - s >= (h if s else 1)
        per_token.append(nll(row[s:s + T + 1], t - s))
      want.append(np.mean(per_token))
    np.testing.assert_allclose(score(tokens, first), want, rtol=1e-5, atol=1e-5)
