"""The learned width router (rag_jax/router.py) and its experiment's comparison."""
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax import configuration
from rag_jax import losses
from rag_jax import router
from tests.conftest import ROOT

router_experiment = configuration.load_module(str(ROOT / 'experiments' / 'router.py'))


def test_expected_gain_is_the_kl_of_full_from_narrow():
  full = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  narrow = jnp.log(jnp.array([[0.25, 0.25, 0.5]]))
  want = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5)  # sum p_full log(p_full/p_narrow)
  assert float(losses.expected_gain(full, narrow)[0]) == pytest.approx(want, abs=1e-6)
  assert float(losses.expected_gain(full, full)[0]) == pytest.approx(0.0, abs=1e-6)


def test_fit_learns_a_gain_that_depends_on_the_features():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(8192, 6)).astype(np.float32)
  gains = np.maximum(0, feats[:, 0] * 0.3 - feats[:, 3] * 0.2) + 0.01 * rng.normal(size=8192)
  fitted, curve = router.fit(feats, gains, hidden=32, steps=800, batch=1024)
  test = rng.normal(size=(2048, 6)).astype(np.float32)
  truth = np.maximum(0, test[:, 0] * 0.3 - test[:, 3] * 0.2)
  predicted = np.asarray(router.predict(fitted, test))
  assert np.corrcoef(predicted, truth)[0, 1] > 0.95
  assert curve[-1][1] < 0.2 * curve[0][1]
  with pytest.raises(ValueError, match='need at least 1024 positions'):
    router.fit(feats[:100], gains[:100], batch=1024)


def test_escalate_takes_the_highest_scores():
  mask = router.escalate(np.array([0.1, 0.9, 0.5, 0.9, 0.0]), 0.4)
  assert mask.tolist() == [False, True, False, True, False]
  assert not router.escalate(np.array([1.0, 2.0]), 0.0).any()


def test_save_and_load_round_trip(tmp_path):
  fitted = router.init(router.jax.random.key(1), 4, 8, np.zeros(4), np.ones(4))
  router.save(str(tmp_path), fitted, 0.25)
  loaded = router.load(str(tmp_path))
  assert loaded.fraction == 0.25 and loaded.params.keys() == fitted.keys()
  for k in fitted:
    np.testing.assert_array_equal(np.asarray(loaded.params[k]), np.asarray(fitted[k]))
  with pytest.raises(ValueError, match='holds no router .* experiments/router.py'):
    router.load(str(tmp_path / 'other'))
  with pytest.raises(ValueError, match='saved without escalation shares'):
    loaded.threshold_for(0.2)


def test_the_share_table_gives_the_threshold_of_a_target_share(tmp_path):
  predicted = np.random.default_rng(0).normal(size=10_000)
  table = router.share_thresholds(predicted)
  fitted = router.init(router.jax.random.key(1), 4, 8, np.zeros(4), np.ones(4))
  router.save(str(tmp_path), fitted, 0.5, table)
  loaded = router.load(str(tmp_path))
  for share in (0.1, 0.25, 0.5):  # 0.25: between two saved shares
    assert np.mean(predicted > loaded.threshold_for(share)) == pytest.approx(share, abs=0.01)
  for share in router.SHARES:  # decoding's `> threshold` picks what the evaluation's rank picks
    np.testing.assert_array_equal(predicted > table[share], router.escalate(predicted, share))
  with pytest.raises(ValueError, match=r'escalation share must be in \[0.05, 0.95\]'):
    loaded.threshold_for(0.99)


def test_bad_router_files_and_a_router_of_another_run_are_refused(tmp_path):
  from rag_jax import workdir as workdir_lib
  from tests.conftest import load_config
  path = tmp_path / router.ROUTER_FILE
  path.write_bytes(b'not a safetensors file')
  with pytest.raises(ValueError, match='not a readable router file .* experiments/router.py'):
    router.load(str(tmp_path))
  from rag_jax import weights
  weights.write_tensors(str(path), {'w1': np.zeros((3, 2), np.float32)}, {})
  with pytest.raises(ValueError, match='not a rag_jax router'):
    router.load(str(tmp_path))
  config = load_config('shakespeare_char', 'smoke')  # embed_dim 32: 34 features
  workdir_lib.save_config(config, str(tmp_path))
  router.save(str(tmp_path), router.init(router.jax.random.key(1), 4, 8, np.zeros(4),
                                         np.ones(4)), 0.5)
  with pytest.raises(ValueError, match='reads 4 features, but this run gives 34 .* another run'):
    router.load(str(tmp_path))


def test_compare_by_hand():
  """Four positions, half escalated: each choice's loss computed by hand."""
  narrow = np.array([2.0, 3.0, 1.0, 4.0])
  full = np.array([1.0, 3.0, 1.0, 2.0])  # realised gains 1, 0, 0, 2
  predicted = np.array([0.9, 0.1, 0.0, 0.5])  # the router picks positions 0 and 3
  confidence = np.array([0.9, 0.1, 0.2, 0.8])  # least confident: positions 1 and 2
  expected = np.array([0.1, 0.0, 0.3, 0.2])  # the expected-gain oracle picks 2 and 3
  (row,) = router_experiment.compare(narrow, full, predicted, confidence, expected, shares=(0.5,))
  assert row['loss_router'] == pytest.approx((1 + 3 + 1 + 2) / 4)
  assert row['loss_oracle'] == pytest.approx((1 + 3 + 1 + 2) / 4)
  assert row['loss_confidence'] == pytest.approx((2 + 3 + 1 + 4) / 4)
  assert row['loss_expected_oracle'] == pytest.approx((2 + 3 + 1 + 2) / 4)
  assert row['loss_random_mix'] == pytest.approx(2.5 - 0.5 * 0.75)
  assert row['precision_router'] == 1.0 and row['precision_confidence'] == 0.0


def _tiny_nested(block_size: int):
  """A random 2-block model and a nested RA activation of 4 buckets: (model, params, act)."""
  import jax
  import ml_collections
  from rag_jax import activation
  from rag_jax.models import gpt
  model = gpt.GPT(gpt.GPTConfig(vocab_size=20, num_layers=2, num_heads=4, embed_dim=32,
                                mlp_dim=64, block_size=block_size))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))['params']
  act = activation.default_config()
  act.update(enabled=True, lam=0.75, buckets=4)
  return model, params, ml_collections.FrozenConfigDict(act)


def test_mixed_context_scores_the_chosen_positions_at_their_widths():
  """experiments/router.mixed_context against a direct pass with the escalation mask by hand;
  a share of 0 is the narrow width's loss."""
  import jax
  from rag_jax import activation, losses, plan as plan_lib
  model, params, act = _tiny_nested(block_size=6)
  cfg = model.cfg
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 7), 0, 20))
  keep = np.array([True, True])
  scores = np.arange(12, dtype=np.float64)[::-1].copy()  # positions 0..5 of row 0 rank first
  out = router_experiment.mixed_context(model, params, act, 0.5, [(tokens, keep)],
                                 {'s': scores}, (0.0, 0.5))
  narrow = plan_lib.as_masks(activation.make_plan(jax.random.key(0), act, cfg, fraction=0.5))
  def direct(mask):
    logits, _ = model.apply({'params': params}, tokens[:, :-1],
                            plan=plan_lib.escalate(narrow, jnp.asarray(mask)))
    return float(losses.token_losses(logits, tokens[:, 1:]).mean())
  assert out['s'][0] == pytest.approx(direct(np.zeros((2, 6), bool)), abs=1e-6)
  assert out['s'][1] == pytest.approx(direct(np.array([[True] * 6, [False] * 6])), abs=1e-6)



@pytest.mark.slow
def test_router_cost_times_the_four_programs_without_escalating():
  """experiments/router_cost.measure: both adaptive programs run the narrow pass only (their
  thresholds are never passed), so their difference is the router's; every median is > 0."""
  import jax
  sys.path.insert(0, str(ROOT / 'experiments'))  # its bench_common
  cost = configuration.load_module(str(ROOT / 'experiments' / 'router_cost.py'))
  model, params, act = _tiny_nested(block_size=12)
  D = model.cfg.embed_dim + 2
  fitted = router.Router(router.init(jax.random.key(3), D, 8, np.zeros(D), np.ones(D)), 0.5)
  out = cost.measure(params, model, act, 0.5, fitted, batch=2, rounds=1)
  assert out['escalated'] == {'confidence_never': 0.0, 'router_never': 0.0}
  assert all(out[k]['ms_per_token'] > 0 for k in cost.programs(model, act, 0.5, fitted))
  assert math.isfinite(out['router_cost_vs_adaptive_step'])


def test_a_requests_threshold_is_given_or_the_routers_for_a_share():
  """router.request_threshold (sample's flags, evaluate's, a server request's): the threshold
  by default; a share needs a router and no threshold beside it, and gives the router's
  threshold for that share; each problem in one message under the user's names."""
  table = router.share_thresholds(np.linspace(0, 1, 1001))
  fitted = router.Router({}, 0.5, table)
  assert router.request_threshold(fitted, 0.3) == 0.3
  assert router.request_threshold(None, 0.3) == 0.3
  assert router.request_threshold(fitted, 0.5, 0.2) == pytest.approx(0.8, abs=1e-3)
  with pytest.raises(ValueError, match='--escalation_share needs a learned router'):
    router.request_threshold(None, 0.5, 0.2, share_name='--escalation_share')
  with pytest.raises(ValueError, match='give threshold or escalation_share, not both'):
    router.request_threshold(fitted, 0.5, 0.2, threshold_given=True)
  with pytest.raises(ValueError, match=r'escalation share must be in \[0.05, 0.95\]'):
    router.request_threshold(fitted, 0.5, 0.99)
