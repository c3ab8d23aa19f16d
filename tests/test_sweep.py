"""The ablation pipeline end to end on alpha_beta_lambda.py:smoke (3 runs): the launcher
(experiments/sweep.py) resumes, skips, reports failures and emits scripts; collect.py and the
analysis notebook read what it wrote."""
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

import nbclient
import nbformat
import pytest

from rag_jax import configuration
from rag_jax import sweeps
from tests.conftest import ROOT

SMOKE = 'configs/ablations/alpha_beta_lambda.py:smoke'
DENSE, RA = 'enabled=False', ('alpha=0.5,beta=1,lam=0.5', 'alpha=2,beta=1,lam=0.5')
NOTEBOOK = ROOT / 'notebooks' / 'analysis.ipynb'
# One worker builds the smoke sweep (`smoke_sweep` also shares it through a file lock), so with
# `pytest -n 2 --dist loadgroup` these tests go to one worker.
pytestmark = pytest.mark.xdist_group('smoke_sweep')


sweep_lib = configuration.load_module(str(ROOT / 'experiments' / 'sweep.py'))


def launch(env, *args, script='sweep.py'):
  return subprocess.run([sys.executable, f'experiments/{script}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def write_sweep_file(path, body: str) -> str:
  """A sweep file on the smoke base (the same config as SMOKE's runs) with its own sweep()."""
  path.write_text(
      'from rag_jax import configuration\nfrom rag_jax import sweeps\n\n\n'
      'def get_config(arg=None):\n'
      f'  return configuration.load_config({str(ROOT / SMOKE.split(":")[0])!r}, "smoke")\n\n\n'
      f'def sweep(arg=None):\n{body}')
  return str(path)


@contextlib.contextmanager
def _shared(tmp_path_factory, name):
  """A directory shared by the pytest-xdist workers of this session, used by one at a time."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield root / name
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope='module')
def env(tfds_dir):
  return {**os.environ, 'TFDS_DATA_DIR': tfds_dir, 'TF_CPP_MIN_LOG_LEVEL': '3',
          'JAX_PLATFORMS': 'cpu'}


@pytest.fixture(scope='module')
def smoke_sweep(tmp_path_factory, env):
  """The smoke sweep run half (the dense run), then whole; the launcher outputs of both."""
  with _shared(tmp_path_factory, 'smoke_sweep') as sweep_dir:
    record = sweep_dir / 'launches.json'
    if not record.exists():
      first = launch(env, f'--config={SMOKE}', f'--sweep_dir={sweep_dir}', f'--only={DENSE}')
      curve = sweep_dir / DENSE / 'eval_curve.json'
      mtime = curve.stat().st_mtime_ns if curve.exists() else None
      second = launch(env, f'--config={SMOKE}', f'--sweep_dir={sweep_dir}')
      record.write_text(json.dumps({
          'launches': [[p.returncode, p.stdout, p.stderr] for p in (first, second)],
          'dense_mtime': mtime}))
    return str(sweep_dir), json.loads(record.read_text())


@pytest.mark.slow
def test_half_done_sweep_resumes_without_redoing_finished_runs(smoke_sweep, env):
  sweep_dir, record = smoke_sweep
  (code1, out1, err1), (code2, out2, err2) = record['launches']
  assert code1 == 0, err1[-3000:]
  assert '1 runs in' in out1 and '0 finished, 1 to run' in out1
  assert code2 == 0, err2[-3000:]
  assert '3 runs in' in out2 and '1 finished, 2 to run' in out2 and 'all 3 runs finished' in out2
  with open(os.path.join(sweep_dir, DENSE, 'sweep.log')) as f:
    assert f.read().count('-m rag_jax.train') == 1  # trained once, by the first launch
  assert os.stat(os.path.join(sweep_dir, DENSE, 'eval_curve.json')).st_mtime_ns == \
      record['dense_mtime']
  again = launch(env, f'--config={SMOKE}', f'--sweep_dir={sweep_dir}')
  assert again.returncode == 0 and '3 finished, 0 to run' in again.stdout
  listed = launch(env, f'--config={SMOKE}', f'--sweep_dir={sweep_dir}', '--list')
  lines = listed.stdout.splitlines()
  assert len(lines) == 3 and all(l.endswith('  done') for l in lines)
  assert lines[1].split()[1:] == [RA[0], 'activation.alpha=0.5', 'activation.beta=1.0',
                                  'activation.lam=0.5', 'done']
  # Under --only each run keeps its index in the whole sweep (what --only takes).
  only = launch(env, f'--config={SMOKE}', f'--sweep_dir={sweep_dir}', '--list', '--only=2')
  assert only.stdout.split()[:2] == ['2', RA[1]]


def test_every_run_is_trained_with_its_overrides_and_evaluated(smoke_sweep):
  sweep_dir, _ = smoke_sweep
  assert sorted(d for d in os.listdir(sweep_dir) if '=' in d) == sorted([DENSE, *RA])
  for run in sweeps.expand(str(ROOT / SMOKE)):
    workdir = os.path.join(sweep_dir, run.name)
    with open(os.path.join(workdir, 'config.json')) as f:
      assert json.load(f) == json.loads(json.dumps(run.config.to_dict()))
    with open(os.path.join(workdir, 'eval_curve.json')) as f:
      curve = json.load(f)
    assert {(e['policy'], e['active_fraction']) for e in curve if e['policy'] == 'fixed'} == {
        ('fixed', a) for a in (1.0, 0.75, 0.5, 0.25)}
    assert any(e['policy'] == 'random' for e in curve) == (run.name != DENSE)
    assert sweep_lib.finished(run, workdir, ['1.0', '0.75', '0.5', '0.25'], 'validation')
    assert not sweep_lib.finished(run, workdir, ['0.1'], 'validation')
    assert not sweep_lib.finished(run, workdir, ['1.0'], 'test')


@pytest.mark.slow
def test_failing_run_is_reported_and_the_others_go_on(smoke_sweep, env, tmp_path):
  """A run whose context is longer than the data fails (found when train loads the data); the
  next run (a copy of the dense run whose evaluation was lost) is still evaluated; the report
  names the failure and its log; exit status 1."""
  sweep_dir, _ = smoke_sweep
  shutil.copytree(os.path.join(sweep_dir, DENSE), tmp_path / 'runs' / DENSE)
  os.remove(tmp_path / 'runs' / DENSE / 'eval_curve.json')
  path = write_sweep_file(tmp_path / 'failing.py', (
      "  yield {'model.block_size': 200000}\n"
      '  yield dict(sweeps.DENSE)\n'))
  proc = launch(env, f'--config={path}', f'--sweep_dir={tmp_path / "runs"}')
  assert proc.returncode == 1
  name = 'block_size=200000'
  assert '2 runs in' in proc.stdout and '0 finished, 2 to run' in proc.stdout
  report = proc.stderr[proc.stderr.index('1 of 2 run(s) failed'):]
  assert f'{name}: rag_jax.train exited with 1: error: the validation split has' in report
  assert f'log: {tmp_path / "runs" / name / "sweep.log"}' in report
  assert os.path.exists(tmp_path / 'runs' / DENSE / 'eval_curve.json')  # the other went on


@pytest.mark.slow
@pytest.mark.parametrize('entry,message', [
    ("{'data.dataset': 'text_files', 'data.paths': '/nonexistent/*.txt'}",
     "config.data.paths: '/nonexistent/\\*.txt' matches no file"),
    ("{**sweeps.DENSE, 'activation.lam': 0.5}",
     '--config.activation.lam has no effect: config.activation.enabled is False'),
])
def test_runs_train_would_refuse_stop_the_sweep_before_anything_runs(env, tmp_path, entry,
                                                                     message):
  """The sweep checks every run with train's own check (train.check_config) first."""
  path = write_sweep_file(tmp_path / 'refused.py', (
      '  yield dict(sweeps.DENSE)\n'
      f'  yield {entry}\n'))
  proc = launch(env, f'--config={path}', f'--sweep_dir={tmp_path / "runs"}')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {path}: run ') and \
      lines[0].endswith('(nothing was run)'), proc.stderr
  assert re.search(message, lines[0]), lines[0]
  assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.slow
def test_bad_override_stops_before_anything_runs(env, tmp_path):
  path = write_sweep_file(tmp_path / 'bad.py', (
      '  yield dict(sweeps.DENSE)\n'
      "  yield {'activation.alhpa': 0.5}\n"))
  proc = launch(env, f'--config={path}', f'--sweep_dir={tmp_path / "runs"}')
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      f"error: {path}: sweep entry 1 {{'activation.alhpa': 0.5}}: the config has no field "
      '`activation.alhpa`.')
  assert not os.path.exists(tmp_path / 'runs')


def test_a_workdir_of_another_config_is_refused(smoke_sweep, tmp_path):
  sweep_dir, _ = smoke_sweep
  path = write_sweep_file(tmp_path / 'other.py', (
      "  yield {'activation.enabled': False, 'num_steps': 30}\n"))
  os.makedirs(tmp_path / 'runs')
  os.symlink(os.path.join(sweep_dir, DENSE), tmp_path / 'runs' / 'enabled=False,num_steps=30')
  with pytest.raises(ValueError, match=r'holds a run of another config \(num_steps: 60 there, '
                                       r'30 here\)'):
    sweep_lib.prepare(path, str(tmp_path / 'runs'), ['1.0'])


@pytest.mark.slow
def test_emit_writes_the_commands(smoke_sweep, env, tmp_path):
  script = tmp_path / 'run_all.sh'
  proc = launch(env, f'--config={SMOKE}', '--sweep_dir=runs/abl', f'--emit={script}')
  assert proc.returncode == 0 and 'wrote' in proc.stdout
  assert subprocess.run(['bash', '-n', str(script)], check=False).returncode == 0
  echoed = subprocess.run(['bash', str(script), '2'], env={**env, 'PYTHON': 'echo'},
                          cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.splitlines()
  assert os.path.isdir(tmp_path / 'runs' / 'abl' / RA[1])  # the script makes the workdir
  workdir = f'runs/abl/{RA[1]}'
  assert echoed == [
      f'-m rag_jax.train --config={SMOKE} --workdir={workdir} --config.activation.alpha=2.0 '
      '--config.activation.beta=1.0 --config.activation.lam=0.5',
      f'-m rag_jax.evaluate --workdir={workdir} --split=validation '
      '--active_fractions=1.0,0.75,0.5,0.25',
      f'-m rag_jax.evaluate --workdir={workdir} --split=validation --policy=random']


@pytest.mark.slow
def test_collect_cli_on_the_smoke_sweep(smoke_sweep, env):
  sweep_dir, _ = smoke_sweep
  proc = launch(env, f'--sweep_dir={sweep_dir}', script='collect.py')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '3 runs, 14 entries' in proc.stdout and 'best at a = 0.5:' in proc.stdout
  for name in ('results.csv', 'results.json', 'summary.md', 'pareto.png', 'heatmaps.png'):
    assert os.path.getsize(os.path.join(sweep_dir, name)) > 0


def test_notebook_is_paired_and_stripped():
  import jupytext  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get('outputs') and not c.get('execution_count')
             for c in nb.cells if c.cell_type == 'code'), 'strip the outputs before committing'
  paired = jupytext.read(ROOT / 'notebooks' / 'analysis.py')
  assert [(c.cell_type, c.source) for c in nb.cells] == \
      [(c.cell_type, c.source) for c in paired.cells], 'run jupytext --sync notebooks/analysis.py'


@pytest.mark.slow
def test_notebook_executes_on_the_smoke_sweep(smoke_sweep, monkeypatch):
  sweep_dir, _ = smoke_sweep
  monkeypatch.setenv('RAG_SWEEP_DIR', sweep_dir)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2  # Pareto plot, heatmaps
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'best at a = 0.5: alpha=' in text
  assert text.count('ROMEO:') >= 2 and ', a = 0.5:' in text and ', a = 1:' in text


def test_only_takes_an_index_a_listed_name_or_a_whole_name():
  """`--only` picks runs by their index in --list, their listed name, or, where --list shortens
  a long name to its start and a digest, the whole name a user would write."""
  runs = sweeps.expand('configs/ablations/frontier.py:routed')
  long = [r for r in runs if r.name != sweeps.full_run_name(r.overrides)]
  assert long, 'the routed sweep has shortened names'
  whole = sweeps.full_run_name(long[0].overrides)
  assert whole.endswith(f'seed={long[0].config.seed}') and '~' not in whole
  assert sweep_lib.select(runs, [whole]) == [long[0]]
  assert sweep_lib.select(runs, [long[0].name]) == [long[0]]
  assert sweep_lib.select(runs, ['2', runs[0].name]) == [runs[0], runs[2]]
  with pytest.raises(ValueError, match=r"--only names no run of this sweep \(6 runs\): "
                                       r"\['6', 'seed=9'\]; give a name or an index"):
    sweep_lib.select(runs, ['6', 'seed=9', '1'])
