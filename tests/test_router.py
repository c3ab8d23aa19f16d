"""The learned width router (rag_jax/router.py) and its experiment's comparison."""
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax import router
from tests.conftest import ROOT


def test_expected_gain_is_the_kl_of_full_from_narrow():
  full = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  narrow = jnp.log(jnp.array([[0.25, 0.25, 0.5]]))
  want = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5)  # sum p_full log(p_full/p_narrow)
  assert float(router.expected_gain(full, narrow)[0]) == pytest.approx(want, abs=1e-6)
  assert float(router.expected_gain(full, full)[0]) == pytest.approx(0.0, abs=1e-6)


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
  loaded, fraction = router.load(str(tmp_path))
  assert fraction == 0.25 and loaded.keys() == fitted.keys()
  for k in fitted:
    np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(fitted[k]))


def test_compare_by_hand():
  """Four positions, half escalated: each choice's loss computed by hand."""
  sys.path.insert(0, str(ROOT / 'experiments'))
  try:
    import router as experiment  # experiments/router.py
  finally:
    sys.path.pop(0)
  narrow = np.array([2.0, 3.0, 1.0, 4.0])
  full = np.array([1.0, 3.0, 1.0, 2.0])  # realised gains 1, 0, 0, 2
  predicted = np.array([0.9, 0.1, 0.0, 0.5])  # the router picks positions 0 and 3
  confidence = np.array([0.9, 0.1, 0.2, 0.8])  # least confident: positions 1 and 2
  expected = np.array([0.1, 0.0, 0.3, 0.2])  # the expected-gain oracle picks 2 and 3
  (row,) = experiment.compare(narrow, full, predicted, confidence, expected, shares=(0.5,))
  assert row['loss_router'] == pytest.approx((1 + 3 + 1 + 2) / 4)
  assert row['loss_oracle'] == pytest.approx((1 + 3 + 1 + 2) / 4)
  assert row['loss_confidence'] == pytest.approx((2 + 3 + 1 + 4) / 4)
  assert row['loss_expected_oracle'] == pytest.approx((2 + 3 + 1 + 2) / 4)
  assert row['loss_random_mix'] == pytest.approx(2.5 - 0.5 * 0.75)
  assert row['precision_router'] == 1.0 and row['precision_confidence'] == 0.0
