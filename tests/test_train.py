"""End-to-end training on the :smoke config: loss falls, resume is exact, 8 devices agree with 1,
NaN stops without saving, workdir files follow docs/design.md §7."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rag_jax import runs
from rag_jax import train
from rag_jax import workdir as workdir_lib
from tests.conftest import ROOT

# One worker trains the module's shared run (make test: pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('smoke_run')


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def restored_params(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  state = mngr.restore(step)
  mngr.close()
  return state['params']


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  """One smoke run shared by the tests that only read its workdir."""
  from tests.conftest import load_config
  config = load_config('shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_loss_falls_on_smoke(trained):
  _, workdir = trained
  rows = read_metrics(workdir)
  evals = [r['eval_loss'] for r in rows if 'eval_loss' in r]
  assert rows[0]['train_loss'] > rows[-1]['train_loss'] + 0.5
  assert evals[-1] < np.log(65) - 0.6  # well below the uniform guess over 65 characters
  assert evals == sorted(evals, reverse=True)


def test_workdir_files_follow_the_contract(trained):
  config, workdir = trained
  names = set(os.listdir(workdir))
  assert {'config.json', 'tokenizer.json', 'metrics.jsonl', 'checkpoints'} <= names
  assert any(n.startswith('events.out.tfevents') for n in names)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == json.loads(json.dumps(config.to_dict()))
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows] == list(range(10, 61, 10))
  for r in rows:
    assert {'step', 'train_loss', 'tokens_per_sec'} <= r.keys()
    assert ('eval_loss' in r) == (r['step'] % config.eval_every == 0)
  assert workdir_lib.latest_step(workdir) == 60


@pytest.mark.slow
def test_resume_gives_the_same_losses(trained, tmp_path):
  """A run that stopped after its step-30 checkpoint and resumed equals the uninterrupted one."""
  config, workdir = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '60'))
  assert workdir_lib.latest_step(resumed) == 30
  train.train_and_evaluate(config, resumed)
  a, b = read_metrics(workdir), read_metrics(resumed)
  assert [r['step'] for r in b] == [r['step'] for r in a]
  for ra, rb in zip(a, b):
    assert ra['train_loss'] == rb['train_loss'], (ra, rb)
    assert ra.get('eval_loss') == rb.get('eval_loss')
  jax.tree.map(np.testing.assert_array_equal, restored_params(workdir, 60),
               restored_params(resumed, 60))


@pytest.mark.slow
def test_train_step_is_pure_and_keyed_by_step(smoke_config):
  smoke_config.model.dropout = 0.1
  model, tx = runs.make_model(smoke_config, 65), runs.make_optimizer(smoke_config)
  state = runs.init_state(model, tx, jax.random.key(0), smoke_config)
  step = jax.jit(train.make_train_step(model, tx))
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 65, (8, 33)), jnp.int32)
  s1, m1 = step(state, batch, jax.random.key(1))
  s1b, m1b = step(state, batch, jax.random.key(1))
  assert float(m1['train_loss']) == float(m1b['train_loss'])
  jax.tree.map(np.testing.assert_array_equal, s1.params, s1b.params)
  assert int(s1.step) == 1
  # The dropout masks come from fold_in(key, step): the same batch at the next step differs.
  _, m2 = step(state.replace(step=state.step + 1), batch, jax.random.key(1))
  assert float(m2['train_loss']) != float(m1['train_loss'])


@pytest.mark.slow
def test_eight_devices_agree_with_one(smoke_config, tfds_env, tmp_path):
  overrides = dict(batch_size=8, eval_batch_size=32, num_steps=30)
  for k, v in overrides.items():
    smoke_config[k] = v
  smoke_config.mesh.data = 1
  one = str(tmp_path / 'one')
  train.train_and_evaluate(smoke_config, one)
  eight = str(tmp_path / 'eight')
  env = {**tfds_env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  cmd = [sys.executable, '-m', 'rag_jax.train', '--config=configs/shakespeare_char.py:smoke',
         f'--workdir={eight}', f'--config.data.data_dir={smoke_config.data.data_dir}',
         '--config.mesh.data=8'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = read_metrics(one), read_metrics(eight)
  assert len(a) == len(b) == 3
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra['train_loss'], rb['train_loss'], rtol=2e-4)
    np.testing.assert_allclose(ra['eval_loss'] if 'eval_loss' in ra else 0,
                               rb['eval_loss'] if 'eval_loss' in rb else 0, rtol=2e-4)


@pytest.mark.slow
def test_nan_loss_stops_without_saving(trained, tmp_path, monkeypatch):
  config, workdir = trained
  run = str(tmp_path / 'nan')
  shutil.copytree(workdir, run)
  before = restored_params(run, 60)
  real_loss = train.loss_fn
  monkeypatch.setattr(train, 'loss_fn', lambda *a, **k: real_loss(*a, **k) * jnp.nan)
  config = config.copy_and_resolve_references()
  config.num_steps = 120  # go on from the step-60 checkpoint
  with pytest.raises(FloatingPointError, match='nan at step 70.*newest checkpoint .* is step 60'):
    train.train_and_evaluate(config, run)
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['30', '60']
  jax.tree.map(np.testing.assert_array_equal, before, restored_params(run, 60))
