"""experiments/adaptive_routing.py's routing gains and experiments/decode_working_set.py's run:
the analyses behind the `adaptive` and `random` decode results (README, "Sampling")."""
import json
import subprocess
import sys

import numpy as np
import pytest

from rag_jax import configuration
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / 'experiments'))
routing = configuration.load_module(str(ROOT / 'experiments' / 'adaptive_routing.py'))


def test_routing_gains_least_confident_against_the_oracle():
  # Per position: narrow - full loss, and the narrow width's confidence.
  gap = np.array([0.5, -0.2, 0.1, 0.0, 0.3, 0.1])
  confidence = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.6])
  gains = routing.routing_gains(gap, confidence, share=2 / 6)
  assert np.isclose(gains['least_confident'], (-0.2 + 0.1) / 6)  # confidences 0.1, 0.2
  assert np.isclose(gains['oracle'], (0.5 + 0.3) / 6)            # the two largest gaps
  assert routing.routing_gains(gap, confidence, 0.0) == {'least_confident': 0.0, 'oracle': 0.0}
  everything = routing.routing_gains(gap, confidence, 1.0)
  assert np.isclose(everything['least_confident'], gap.mean())
  assert np.isclose(everything['oracle'], gap.mean())


@pytest.mark.slow
def test_decode_working_set_runs_every_layout_and_pattern(tmp_path):
  out = tmp_path / 'ws.json'
  proc = subprocess.run(
      [sys.executable, 'experiments/decode_working_set.py', '--layers=2', '--embed_dim=8',
       '--mlp_dim=12', '--buckets=6', '--tokens=3', '--repeats=1', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result['drawn_buckets'] == [2, 3, 4, 5, 6]
  nbytes = result['weight_bytes']
  assert nbytes['pieces'] == nbytes['dense'] == 2 * 2 * 8 * 12 * 4
  assert nbytes['copies'] * 6 == nbytes['dense'] * (2 + 3 + 4 + 5 + 6)  # one array per width
  assert set(result['patterns']) == {'random', 'full', 'half'}
  assert result['patterns']['full']['mean_width'] == 1.0
  assert result['patterns']['half']['mean_width'] == 0.5
  for pattern in result['patterns'].values():
    assert set(pattern['layouts']) == {'dense', 'copies', 'pieces'}
    assert pattern['max_abs_difference']['pieces_vs_copies'] < 1e-5  # the same widths computed
  assert result['patterns']['full']['max_abs_difference']['copies_vs_dense'] < 1e-5
