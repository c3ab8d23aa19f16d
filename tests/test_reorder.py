"""rag_jax/reorder.py: reordering units and heads by importance changes nothing the model
computes, and puts units that do nothing last."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax import reorder
from rag_jax import runs
from rag_jax.models import gpt

CFG = gpt.GPTConfig(vocab_size=40, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=48,
                    block_size=16, use_bias=True)


def _params():
  params = jax.device_get(runs.init_params(gpt.GPT(CFG), jax.random.key(0)))
  rng = np.random.default_rng(0)  # non-zero biases, so that their permutation is checked too
  return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)


def _tokens(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, CFG.block_size + 1))


def test_permutation_preserves_the_function():
  params = _params()
  rng = np.random.default_rng(1)
  order = {'mlp': np.stack([rng.permutation(48) for _ in range(2)]),
           'heads': np.stack([rng.permutation(4) for _ in range(2)])}
  model = gpt.GPT(CFG)
  x = jnp.asarray(_tokens()[:, :-1], jnp.int32)
  want, _ = model.apply({'params': params}, x)
  got, _ = model.apply({'params': reorder.permute(params, order)}, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_units_that_do_nothing_go_last():
  params = _params()
  dead_unit, dead_head = 5, 1
  params['block_0']['mlp']['w_out'][dead_unit] = 0.0   # unit 5 of layer 0 reaches nothing
  params['block_1']['attn']['out'][dead_head] = 0.0    # head 1 of layer 1 reaches nothing
  model = gpt.GPT(CFG)
  scores = reorder.importance(model, params, [_tokens(4, s) for s in range(2)])
  assert scores['mlp'].shape == (2, 48) and scores['heads'].shape == (2, 4)
  assert scores['mlp'][0, dead_unit] == 0 and scores['heads'][1, dead_head] == 0
  assert (np.delete(scores['mlp'][0], dead_unit) > 0).all()
  new, sorted_scores = reorder.by_importance(model, params, [_tokens(4, s) for s in range(2)])
  assert (np.diff(sorted_scores['mlp'], axis=1) <= 0).all()
  assert (np.diff(sorted_scores['heads'], axis=1) <= 0).all()
  assert not np.any(new['block_0']['mlp']['w_out'][-1])
  assert np.any(new['block_0']['mlp']['w_out'][0])
  assert not np.any(new['block_1']['attn']['out'][-1])
  x = jnp.asarray(_tokens()[:, :-1], jnp.int32)  # by_importance's own output computes the same
  want, _ = model.apply({'params': params}, x)
  got, _ = model.apply({'params': new}, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.any(new['block_0']['mlp']['w_in'] != params['block_0']['mlp']['w_in'])  # reordered
