"""The per-layer width search (rag_jax/search.py) on a small random model."""
import jax
import numpy as np
import pytest

from rag_jax import activation
from rag_jax import evaluate
from rag_jax import flops
from rag_jax import search
from rag_jax.models import gpt

CFG = gpt.GPTConfig(vocab_size=23, num_layers=3, num_heads=4, embed_dim=16, mlp_dim=32,
                    block_size=8)


@pytest.fixture(scope='module')
def model_params():
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), np.zeros((1, CFG.block_size), np.int32))['params']
  act = activation.default_config()
  act.update(enabled=True, lam=0.75, buckets=4)
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 2000).astype(np.uint8)
  return model, params, act, tokens


@pytest.mark.slow
def test_plan_flops_of_a_uniform_plan_equal_evaluates_count(model_params):
  _, _, act, _ = model_params
  for a, b in ((1.0, 3), (0.5, 1), (0.25, 0)):
    uniform = {'mlp': [b] * 3, 'heads': [b] * 3}
    assert search.plan_flops(uniform, act, CFG) == flops.flops_per_token(
        CFG, **activation.compute_fractions(act, CFG, a))


@pytest.mark.slow
def test_drawn_and_static_plans_score_the_same(model_params):
  model, params, act, tokens = model_params
  buckets = {'mlp': [3, 0, 2], 'heads': [1, 3, 0]}
  batch = tokens[:9 * 4].reshape(4, 9).astype(np.int32)
  ones = np.ones(4, np.float32)
  losses = []
  for static in (True, False):
    plan = activation.plan_of(buckets if static else jax.tree.map(np.int32, buckets), act, CFG,
                          static=static)
    step = jax.jit(evaluate.make_eval_step(model, lambda key, shape, p=plan: p))
    losses.append(float(step(params, batch, ones, jax.random.key(0))[0]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


@pytest.mark.slow
def test_search_stays_within_budget_and_is_deterministic(model_params):
  model, params, act, tokens = model_params
  target = flops.flops_per_token(CFG, **activation.compute_fractions(act, CFG, 0.5))
  run = lambda seed: search.search(params, model, act, tokens, target, batches=2, batch_size=4,
                                   seed=seed)
  first, again = run(0), run(0)
  assert first['within_budget'] and first['flops_per_token'] <= target
  assert first['buckets'] == again['buckets'] and first['search_loss'] == again['search_loss']
  # Each step of the descent is cheaper than the one before; each swap after it stays within
  # the budget and lowers the loss.
  descent = [h for h in first['history'] if not h.get('swap')]
  costs = [h['flops_per_token'] for h in descent]
  assert all(a > b for a, b in zip(costs, costs[1:]))
  swaps = [descent[-1]] + [h for h in first['history'] if h.get('swap')]
  assert all(h['flops_per_token'] <= target for h in swaps)
  assert all(a['loss'] > b['loss'] for a, b in zip(swaps, swaps[1:]))
  assert first['history'][0]['buckets'] == {'mlp': [3, 3, 3], 'heads': [3, 3, 3]}
  # The budget of evaluations is respected.
  short = search.search(params, model, act, tokens, target, batches=2, batch_size=4,
                        max_evaluations=5)
  assert short['evaluations'] <= 5 and not short['within_budget']


def test_search_counts_are_checked_before_the_work(monkeypatch):
  """--batches=0 (and the other counts) get one message before the run is even loaded."""
  monkeypatch.setattr(search.runs, 'load_run', lambda w: (_ for _ in ()).throw(
      AssertionError('loaded before the counts were checked')))
  for kwargs, message in ((dict(batches=0), '--batches must be an integer of at least 1'),
                          (dict(max_evaluations=-1), '--max_evaluations must be'),
                          (dict(seed=-2), '--seed must be an integer of at least 0')):
    with pytest.raises(ValueError, match=message):
      search.run_search('unused', 0.5, **kwargs)
