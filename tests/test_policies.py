"""Policy objects (rag_jax/policies.py): one piece of code decides each token's width in
teacher-forced evaluation and in decoding."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rag_jax import activation
from rag_jax import evaluate
from rag_jax import plan as plan_lib
from rag_jax import policies
from rag_jax import sampling
from rag_jax.models import gpt

CFG = gpt.GPTConfig(vocab_size=20, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                    block_size=12)


def act_config(**overrides):
  act = activation.default_config()
  act.update(**{'enabled': True, 'lam': 0.75, 'buckets': 4, **overrides})
  return ml_collections.FrozenConfigDict(act)


@pytest.fixture(scope='module')
def model_params():
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.block_size), jnp.int32))['params']
  return model, jax.tree.map(lambda p: p * 3.0, params)


@pytest.mark.parametrize('sites', ['mlp,heads', 'mlp,heads,layers'])
def test_random_widths_drawn_in_decoding_and_in_evaluation_are_the_same(model_params, sites):
  """For the same key, the plan that decoding feeds index t through (the decoder's table) and
  the plan evaluation scores position t with (a row's masks) switch the same units."""
  model, params = model_params
  policy = policies.make('random', act_config(sites=sites), model=None)
  key = jax.random.key(3)
  row_key = jax.random.split(key, 1)[0]  # evaluation's key for row 0 of a batch of 1
  decoder = policy.decoder(params, model, row_key, CFG.block_size)
  scored = policy.eval_plan(key, CFG, 1, CFG.block_size)
  seen = set()
  for t in range(CFG.block_size):
    fed = plan_lib.as_masks(decoder.plan_at(t))
    row_t = jax.tree.map(lambda x, t=t: x[0, t], scored)
    for a, b in zip(jax.tree.leaves(fed), jax.tree.leaves(row_t)):
      np.testing.assert_array_equal(a, b)
    seen.add(float(plan_lib.active_fractions(decoder.plan_at(t))['mlp'].mean()))
  assert len(seen) > 1  # the draws differ between positions


def test_adaptive_escalates_the_same_tokens_in_decoding_and_in_evaluation(model_params):
  """A decoder's prefill and evaluation's adaptive pass escalate the same positions."""
  model, params = model_params
  policy = policies.make('adaptive', act_config(), fraction=0.5, threshold=0.6)
  tokens = jax.random.randint(jax.random.key(1), (3, CFG.block_size), 0, CFG.vocab_size)
  _, _, decoded = policy.decoder(params, model, jax.random.key(0), 16).prefill(tokens, 0)
  narrow, _ = model.apply({'params': params}, tokens, plan=policy.narrow(CFG))
  scored, _ = policy.eval_plans(policy.signal(narrow), CFG, policy.threshold)
  np.testing.assert_array_equal(decoded, scored)
  np.testing.assert_array_equal(decoded, sampling.confidence(narrow) < 0.6)  # the rule itself
  assert 0 < np.mean(decoded) < 1
  step = evaluate.make_adaptive_step(model, act_config(), 0.5, (0.6,))
  _, escalated, count = step(params, jnp.pad(tokens, ((0, 0), (0, 1))), jnp.ones(3),
                             jax.random.key(0))
  assert int(escalated[0]) == int(np.sum(decoded)) and int(count) == tokens.size


def test_a_router_escalates_the_same_tokens_in_decoding_and_in_evaluation(model_params):
  """With a learned router (here random weights), the decoder's prefill, evaluation's adaptive
  pass and the escalation count of evaluate's step agree; the threshold is a predicted gain."""
  from rag_jax import router as router_lib
  model, params = model_params
  D = CFG.embed_dim
  learned = router_lib.Router(router_lib.init(jax.random.key(5), D + 2, 8, np.zeros(D + 2),
                                              np.ones(D + 2)), 0.5)
  tokens = jax.random.randint(jax.random.key(1), (3, CFG.block_size), 0, CFG.vocab_size)
  plan = policies.make('adaptive', act_config(), fraction=0.5).narrow(CFG)
  (narrow, _), hidden = router_lib.apply_with_hidden(model, {'params': params}, tokens,
                                                     plan=plan)
  gain = learned.gain(hidden, narrow)
  threshold = float(np.median(np.asarray(gain)))  # half the positions escalate
  policy = policies.make('adaptive', act_config(), fraction=0.5, threshold=threshold,
                         router=learned)
  _, _, decoded = policy.decoder(params, model, jax.random.key(0), 16).prefill(tokens, 0)
  scored, _ = policy.eval_plans(gain, CFG, threshold)
  np.testing.assert_array_equal(decoded, scored)
  np.testing.assert_array_equal(decoded, np.asarray(gain) > threshold)
  assert 0.3 < np.mean(decoded) < 0.7
  step = evaluate.make_adaptive_step(model, act_config(), 0.5, (threshold,), learned)
  _, escalated, _ = step(params, jnp.pad(tokens, ((0, 0), (0, 1))), jnp.ones(3),
                         jax.random.key(0))
  assert int(escalated[0]) == int(np.sum(decoded))
  with pytest.raises(ValueError, match='the router routes from the width 0.5; give '
                     'draft_fraction=0.5, not 0.25'):
    policies.make('adaptive', act_config(), fraction=0.25, router=learned)


def test_policy_names_and_bad_settings():
  assert policies.NAMES == ('dense', 'fixed', 'random', 'adaptive', 'speculative')
  assert policies.make('dense') == policies.Fixed(act=None, fraction=1.0)
  assert policies.make('fixed', act_config(), fraction=0.5).describe() == 'fixed 0.5'
  bad = {
      'policy must be one of': dict(name='greedy'),
      'policy fixed needs --active_fraction': dict(name='fixed'),
      'goes with policy fixed, not random': dict(name='random', fraction=0.5),
      'would generate with the dense model': dict(name='random', act=act_config(lam=0.0)),
      'escalates from a nested width': dict(name='adaptive', act=act_config(structure='random')),
      r'needs a draft_fraction in \(0, 1\)': dict(name='adaptive', fraction=1.0),
      'threshold must be >= 0': dict(name='adaptive', threshold=-1.0),
  }
  for message, kwargs in bad.items():
    name = kwargs.pop('name')
    with pytest.raises(ValueError, match=message):
      policies.make(name, kwargs.pop('act', act_config()), **kwargs)
