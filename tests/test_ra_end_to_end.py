"""Random activation through the command-line contract: train, evaluate, sample."""
import json
import os
import subprocess
import sys

import numpy as np
import jax
import pytest

from rag_jax import activation
from rag_jax import evaluate
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import train
from tests.conftest import ROOT, load_config

# One worker trains the module's shared run (make test: pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('ra_run')


@pytest.fixture(scope='module')
def ra_run(tmp_path_factory, tfds_dir):
  config = load_config('ra_shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  workdir = str(tmp_path_factory.mktemp('ra'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


@pytest.mark.slow
def test_ra_training_draws_widths_and_learns(ra_run):
  config, workdir = ra_run
  rows = _metrics(workdir)
  assert rows[-1]['train_loss'] < rows[0]['train_loss'] - 0.5
  active = [r['active_mlp'] for r in rows]
  # a ~ U[0.25, 1] rounded up to quarters: the mean realized width is about 0.69.
  assert all(0.25 <= a <= 1.0 for a in active) and len(set(active)) > 1
  assert abs(np.mean(active) - 0.69) < 0.1


@pytest.mark.slow
def test_sandwich_trains_full_and_drawn_width(smoke_config, tmp_path):
  smoke_config.activation.update(enabled=True, lam=0.75, train_mode='sandwich')
  smoke_config.num_steps = 20
  train.train_and_evaluate(smoke_config, str(tmp_path))
  rows = _metrics(str(tmp_path))
  assert all('train_loss_drawn' in r for r in rows)
  assert any(r['train_loss_drawn'] > r['train_loss'] for r in rows)  # narrower is worse


@pytest.mark.slow
def test_evaluate_curve_over_fractions_and_random_policy(ra_run):
  _, workdir = ra_run
  fixed = evaluate.evaluate(workdir, (1.0, 0.75, 0.5, 0.25), 'fixed', 'validation')
  flops = [e['flops_per_token'] for e in fixed]
  assert all(a > b for a, b in zip(flops, flops[1:]))
  losses = [e['loss'] for e in fixed]
  assert losses[0] < losses[-1]
  rand = evaluate.evaluate(workdir, (), 'random', 'validation')[0]
  assert flops[-1] < rand['flops_per_token'] < flops[0]
  assert 0.25 < rand['active_fraction'] < 1.0 and rand['lam'] == 0.75
  with open(os.path.join(workdir, 'eval_curve.json')) as f:
    curve = json.load(f)
  assert {(e['policy'], e['active_fraction']) for e in curve} >= {
      ('fixed', 1.0), ('fixed', 0.5), ('random', rand['active_fraction'])}


@pytest.mark.slow
def test_adaptive_policy_spans_the_narrow_and_the_full_width(ra_run):
  """A threshold nothing falls below scores the narrow width (at its FLOPs); a threshold every
  token falls below scores the full width, at the narrow plus the full FLOPs."""
  _, workdir = ra_run
  fixed = {e['active_fraction']: e for e in evaluate.evaluate(workdir, (1.0, 0.5), 'fixed')}
  low, high = evaluate.evaluate(workdir, policy='adaptive', draft_fraction=0.5,
                                thresholds=(1e-9, 1.0))
  assert low['escalated'] == 0 and abs(low['loss'] - fixed[0.5]['loss']) < 1e-5
  assert low['flops_per_token'] == fixed[0.5]['flops_per_token']
  assert high['escalated'] > 0.999 and abs(high['loss'] - fixed[1.0]['loss']) < 1e-3
  assert abs(high['flops_per_token'] - fixed[0.5]['flops_per_token']
             - high['escalated'] * fixed[1.0]['flops_per_token']) < 1
  with open(os.path.join(workdir, 'eval_curve.json')) as f:
    adaptive = [e for e in json.load(f) if e['policy'] == 'adaptive']
  assert sorted(e['threshold'] for e in adaptive) == [1e-9, 1.0]
  with pytest.raises(ValueError, match='thresholds must be probabilities'):
    evaluate.evaluate(workdir, policy='adaptive', thresholds=(0.0,))


@pytest.mark.slow
def test_router_policy_in_evaluate_and_sample(ra_run, tmp_path, tfds_env):
  """A router saved in the workdir is what `evaluate --policy=adaptive --router` and `sample
  --policy=adaptive --router` decide with: a threshold below every predicted gain scores the
  full width, one above them the narrow width; the CLIs take its width as the draft width."""
  import shutil
  from rag_jax import router as router_lib
  _, source = ra_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    D = json.load(f)['model']['embed_dim']
  params = router_lib.init(jax.random.key(0), D + 2, 4, np.zeros(D + 2), np.ones(D + 2))
  params['w2'] = params['w2'] * 0  # a constant prediction: its bias
  params['b2'] = params['b2'] + 0.5
  router_lib.save(workdir, params, 0.5)
  fixed = {e['active_fraction']: e for e in evaluate.evaluate(workdir, (1.0, 0.5), 'fixed')}
  below, above = evaluate.evaluate(workdir, policy='adaptive', draft_fraction=None,
                                   thresholds=(0.4, 0.6), router=True)
  assert below['router'] and below['escalated'] > 0.999
  assert abs(below['loss'] - fixed[1.0]['loss']) < 1e-3
  assert above['escalated'] == 0 and abs(above['loss'] - fixed[0.5]['loss']) < 1e-5
  with pytest.raises(ValueError, match='routes from the width 0.5; give --draft_fraction=0.5'):
    evaluate.evaluate(workdir, policy='adaptive', draft_fraction=0.25, router=True)
  run = lambda *a: subprocess.run([sys.executable, '-m', *a], cwd=ROOT, env=tfds_env,
                                  capture_output=True, text=True, timeout=300)
  proc = run('rag_jax.evaluate', f'--workdir={workdir}', '--policy=adaptive', '--router',
             '--thresholds=0.6')
  assert proc.returncode == 0 and 'adaptive 0.5 @ 0.6 router (up 0%)' in proc.stdout, proc.stderr
  proc = run('rag_jax.sample', f'--workdir={workdir}', '--policy=adaptive', '--router',
             '--threshold=0.4', '--prompt=ROMEO:', '--num_tokens=12', '--greedy')
  dense = run('rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO:', '--num_tokens=12',
              '--greedy')
  assert proc.returncode == 0 and dense.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split('-' * 40)[0] == dense.stdout.split('-' * 40)[0]  # always escalated


@pytest.mark.slow
def test_router_experiment_end_to_end(ra_run, tmp_path, tfds_env):
  """experiments/router.py on the smoke RA run: it fits, scores every share in both contexts,
  times decoding and saves a router that evaluate loads."""
  import shutil
  _, source = ra_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  out = tmp_path / 'router.json'
  proc = subprocess.run([sys.executable, 'experiments/router.py', f'--workdir={workdir}',
                         '--draft_fraction=0.5', '--train_batches=2', '--batch=8', '--batches=2',
                         '--steps=20', '--timing_tokens=4', '--save', f'--out={out}'], cwd=ROOT,
                        env=tfds_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert [r['share'] for r in result['shares']] == [0.1, 0.2, 0.3, 0.4, 0.5]
  gap = result['loss_narrow'] - result['loss_full']
  for row in result['shares']:
    assert row['loss_random_mix'] == pytest.approx(result['loss_narrow'] - row['share'] * gap,
                                                   abs=1e-6)
    assert set(row['mixed_context']) == {'loss_router', 'loss_confidence', 'loss_random',
                                         'loss_expected_oracle', 'loss_oracle'}
  assert result['timing']['router_never_batch8']['ms_per_step'] > 0
  entries = evaluate.evaluate(workdir, policy='adaptive', draft_fraction=None,
                              thresholds=(1e9,), router=True)
  assert entries[0]['escalated'] == 0 and entries[0]['draft_fraction'] == 0.5


@pytest.mark.slow
def test_dense_run_is_truncated_for_the_baseline(tmp_path, smoke_config):
  smoke_config.num_steps = 20
  train.train_and_evaluate(smoke_config, str(tmp_path))
  entries = evaluate.evaluate(str(tmp_path), (1.0, 0.5), 'fixed', 'validation')
  # A barely trained model need not get worse; the truncation must change what is computed.
  assert entries[0]['loss'] != entries[1]['loss']
  assert entries[1]['flops_per_token'] < entries[0]['flops_per_token']
  assert entries[1]['structure'] == 'nested'


@pytest.mark.slow
def test_sampling_policies(ra_run):
  config, workdir = ra_run
  _, tokenizer, _, params, _ = runs.load_run(workdir)
  run = lambda **kw: sample_lib.sample(params, config, ['ROMEO:'], tokenizer=tokenizer,
                                       num_tokens=40, **kw)
  dense = run(policy='dense')
  assert np.all(dense.fractions == 1.0)
  half = run(policy='fixed', active_fraction=0.5)
  assert np.allclose(half.fractions, 0.5)
  rand = run(policy='random')
  assert len(set(np.round(rand.fractions.ravel(), 4))) > 2  # varies from step to step
  assert 0.25 <= rand.fractions.min() and rand.fractions.max() <= 1.0
  np.testing.assert_array_equal(rand.tokens, run(policy='random').tokens)
  assert rand.text[0].startswith('ROMEO:')


@pytest.mark.slow
def test_random_policy_fractions_follow_the_distribution(ra_run):
  """The per-step fractions recorded under `random` average to the expected realized width of
  a = 1 - 0.75 B, B ~ U(0, 1), rounded up to quarters (about 0.69)."""
  config, workdir = ra_run
  _, tokenizer, model, params, _ = runs.load_run(workdir)
  out = sample_lib.sample(params, config, ['\n'], tokenizer=tokenizer, num_tokens=300, seed=3,
                          policy='random')
  want = activation.compute_fractions(config.activation, model.cfg)['mlp']
  assert abs(out.fractions.mean() - want) < 0.03


@pytest.mark.slow
def test_cli_sample_random_policy(ra_run, tfds_env):
  _, workdir = ra_run
  proc = subprocess.run(
      [sys.executable, '-m', 'rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO:',
       '--num_tokens=30', '--policy=random'], cwd=ROOT, env=tfds_env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'policy random, mean active fraction' in proc.stdout
  proc = subprocess.run(
      [sys.executable, '-m', 'rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO:',
       '--policy=fixed'], cwd=ROOT, env=tfds_env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'needs --active_fraction' in proc.stderr


@pytest.mark.slow
def test_per_layer_search_on_a_trained_run(ra_run, tmp_path, tfds_env):
  """rag_jax.search on the smoke RA run: a plan within the FLOPs of a = 0.5, scored with the
  uniform width on validation and test (the CLI writes it as JSON)."""
  from rag_jax import search
  _, workdir = ra_run
  result = search.run_search(workdir, 0.5, batches=2, seed=0)
  assert result['within_budget']
  assert result['flops_per_token'] <= result['target_flops_per_token']
  for split in ('validation', 'test'):
    assert np.isfinite(result[f'plan_{split}_loss'])
    assert np.isfinite(result[f'uniform_{split}_loss'])
  out = tmp_path / 'plan.json'
  proc = subprocess.run([sys.executable, '-m', 'rag_jax.search', f'--workdir={workdir}',
                         '--active_fraction=0.5', '--batches=2', f'--out={out}'], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=tfds_env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(out.read_text())['buckets'] == result['buckets']
  assert 'per-layer plan' in proc.stdout


@pytest.mark.slow
def test_adaptive_routing_and_pass_costs_on_a_trained_run(ra_run, tmp_path, tfds_env):
  """experiments/adaptive_routing.py and speculative_pass_costs.py on the smoke RA run: the
  oracle's gain bounds the policy's, and a k-token iteration costs k draft steps and one k + 1
  pass, in dense steps."""
  _, workdir = ra_run
  routing_out, costs_out = tmp_path / 'routing.json', tmp_path / 'costs.json'
  for args in (['experiments/adaptive_routing.py', '--draft_fraction=0.5', '--batches=2',
                '--batch=4', '--thresholds=0.3,1.0', f'--out={routing_out}'],
               ['experiments/speculative_pass_costs.py', '--draft_fraction=0.5',
                '--positions=1,3', '--at=4', '--loop=2', '--repeats=2', f'--out={costs_out}']):
    proc = subprocess.run([sys.executable, *args, f'--workdir={workdir}'], cwd=ROOT,
                          env=tfds_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
  routing = json.loads(routing_out.read_text())
  for row in routing['thresholds']:
    # Two code paths agree: the escalated positions' full-context loss, and the narrow loss less
    # the least confident share's gain (routing_gains, checked by hand in test_decode_analyses).
    gain = row['gain_over_narrow']
    assert abs(row['full_context_loss'] - (routing['narrow_loss'] - gain['least_confident'])) < 1e-4
    assert 0 <= row['escalated'] <= 1
  everything = routing['thresholds'][1]  # threshold 1: (nearly) every position escalates
  assert everything['escalated'] > 0.999
  assert abs(everything['full_context_loss'] - routing['full_loss']) < 1e-3
  costs = json.loads(costs_out.read_text())
  rows = costs['programs']
  median = {name: row['ms']['median'] for name, row in rows.items()}  # the raw timings
  for name, row in rows.items():
    assert np.isclose(row['vs_full_1'], median[name] / median['full_1'])
  # A 2-token iteration: 2 draft steps and one 3-token full pass, in full L = 1 steps.
  assert np.isclose(costs['bound']['2']['iteration_in_dense_steps'],
                    (2 * median['draft_1'] + median['full_3']) / median['full_1'])


@pytest.mark.slow
def test_evaluate_scores_every_width_of_an_ra_run_by_default(ra_run):
  _, workdir = ra_run
  entries = evaluate.evaluate(workdir, split='validation')
  assert [e['active_fraction'] for e in entries] == [1.0, 0.75, 0.5, 0.25]
  assert [round(e['relative_flops'], 6) for e in entries] == sorted(
      (round(e['relative_flops'], 6) for e in entries), reverse=True)
  assert entries[0]['relative_flops'] == 1.0
