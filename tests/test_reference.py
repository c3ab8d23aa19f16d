"""experiments/bench_reference.py: its PyTorch GPT computes rag_jax's dense step (same loss,
gradient norm and AdamW update from the same parameters). Needs torch, the benchmark's optional
dependency (`pip install -e '.[bench]'`, or `make reference`); skipped, and reported so by
pytest's summary, where torch is not installed (as in `make test` on a fresh clone)."""
import sys

import pytest

from tests.conftest import ROOT, load_config

torch = pytest.importorskip('torch',
                            reason='torch (the reference benchmark\'s extra) is not installed')
sys.path.insert(0, str(ROOT / 'experiments'))
import bench_reference  # noqa: E402  (after the path to experiments/)


@pytest.mark.slow
def test_torch_reference_step_equals_rag_jax_step():
  config = load_config('shakespeare_char', 'smoke')
  config.model.dropout = 0.0
  got = bench_reference.check_equivalence(config, 65, torch)
  assert abs(got['loss_torch'] - got['loss_rag_jax']) < 1e-4
  assert abs(got['grad_norm_torch'] - got['grad_norm_rag_jax']) < 1e-3 * got['grad_norm_rag_jax']
  # Adam's first step moves every weight by about the learning rate: the two agree far closer.
  assert got['max_abs_param_diff_after_step'] < 0.1 * got['learning_rate']
