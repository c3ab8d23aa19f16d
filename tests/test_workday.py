"""A researcher's daily loop: workdirs named as URIs (every file through epath), the profiler
trace, TensorBoard hyperparameters, W&B in offline mode, the loss plot, and a repository that
needs nothing outside itself."""
import glob
import json
import os
import subprocess
import sys

from etils.epath import gpath
from etils.epath import testing as epath_testing
import numpy as np
import pytest

from rag_jax import configuration
from rag_jax import files
from rag_jax import metrics
from rag_jax import weights
from rag_jax.data import tokenizers
from rag_jax.errors import ConfigError
from tests.conftest import ROOT


def _cli(module, *args, env):
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_uri_workdir_profile_hparams_and_offline_wandb(tfds_env, tmp_path):
  """train/evaluate/sample given the workdir as a file:// URI (the path forms go through
  files.path/epath), with a profiler trace of steps 2-3 and W&B in offline mode."""
  pytest.importorskip('wandb')
  local = tmp_path / 'run'
  uri = f'file://{local}'
  env = {**tfds_env, 'WANDB_SILENT': 'true'}
  _cli('rag_jax.train', '--config=configs/shakespeare_char.py:smoke', f'--workdir={uri}',
       '--config.num_steps=20', '--config.profile_steps=2,3', '--config.wandb.project=rag-test',
       '--config.wandb.mode=offline', env=env)
  names = set(os.listdir(local))
  assert {'config.json', 'tokenizer.json', 'metrics.jsonl', 'checkpoints',
          metrics.WANDB_ID_FILE} <= names
  assert not os.path.exists('file:')  # nothing written under a relative 'file:' directory
  # The profiler trace, where TensorBoard's profile tab looks.
  assert glob.glob(str(local / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  # The config as TensorBoard hyperparameters beside the scalars.
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(local))
  acc.Reload()
  assert 'train_loss' in acc.Tags()['scalars']
  assert '_hparams_/session_start_info' in acc.PluginTagToContent('hparams')
  start = acc.PluginTagToContent('hparams')['_hparams_/session_start_info']
  assert b'activation.alpha' in start and b'opt.learning_rate' in start
  # W&B's offline run, in the workdir, under the id the workdir keeps.
  run_id = (local / metrics.WANDB_ID_FILE).read_text().strip()
  assert glob.glob(str(local / 'wandb' / f'offline-run-*-{run_id}' / f'run-{run_id}.wandb'))

  _cli('rag_jax.evaluate', f'--workdir={uri}', '--split=validation', '--active_fractions=1.0',
       env=env)
  assert json.loads((local / 'eval_curve.json').read_text())[0]['policy'] == 'fixed'
  out = _cli('rag_jax.sample', f'--workdir={uri}', '--prompt=ROMEO:', '--num_tokens=8',
             '--seed=0', env=env)
  assert out.stdout.startswith('ROMEO:')
  # A resume continues the same W&B run: the id file is kept and the new offline run has it.
  _cli('rag_jax.train', '--config=configs/shakespeare_char.py:smoke', f'--workdir={uri}',
       '--config.num_steps=30', '--config.wandb.project=rag-test', '--config.wandb.mode=offline',
       env=env)
  assert (local / metrics.WANDB_ID_FILE).read_text().strip() == run_id
  runs_dirs = glob.glob(str(local / 'wandb' / 'offline-run-*'))
  assert len(runs_dirs) == 2 and all(d.endswith(f'-{run_id}') for d in runs_dirs)


def test_profile_steps_checked():
  from tests.conftest import load_config
  config = load_config('shakespeare_char', 'smoke')
  for bad in ('3', '5,2', '0,2', 'a,b', f'1,{config.num_steps + 1}', '1,2,3'):
    config.profile_steps = bad
    if bad == '3':
      assert configuration.profile_steps(config) == (3, 3)
      continue
    with pytest.raises(ConfigError, match='profile_steps'):
      configuration.validate(config)
  config.profile_steps = '20,22'
  assert configuration.profile_steps(config) == (20, 22)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """gs://bucket/... served from tmp_path/bucket/... through epath's own backend hooks: what the
  package writes to a gs:// path goes through epath (nothing here reaches Google Cloud)."""
  to_local = lambda p: str(p).replace('gs://', f'{tmp_path}/')
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # else TF's gfile, not the mock
  monkeypatch.setattr(files, 'ENDPOINTS', {})  # no store to probe: the mock answers

  def one(fn):
    return lambda original, path, *a, **k: fn(original, to_local(path), *a, **k)

  call = lambda original, path, *a, **k: original(path, *a, **k)
  two = lambda original, path, dst, *a, **k: original(to_local(path), to_local(dst), *a, **k)
  listing = lambda original, path: original(to_local(path))
  with epath_testing.mock_epath(
      open=one(call), exists=one(call), isdir=one(call), listdir=listing, makedirs=one(call),
      mkdir=one(call), remove=one(call), rmtree=one(call), stat=one(call), rename=two,
      replace=two, copy=two, glob=lambda original, path: [
          p.replace(f'{tmp_path}/', 'gs://') for p in original(to_local(path))]):
    yield tmp_path


def test_package_files_go_through_epath_to_gs_paths(gcs):
  root = 'gs://bucket/run'
  files.makedirs(root)
  files.write_json(f'{root}/config.json', {'a': 1})
  assert files.read_json(f'{root}/config.json') == {'a': 1}
  assert json.loads((gcs / 'bucket' / 'run' / 'config.json').read_text()) == {'a': 1}
  tok = tokenizers.CharTokenizer('abc\n')
  tokenizers.save(tok, f'{root}/tokenizer.json')
  assert tokenizers.load(f'{root}/tokenizer.json').to_json() == tok.to_json()
  params = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  weights.save(params, root)
  assert (gcs / 'bucket' / 'run' / weights.WEIGHTS_FILE).exists()
  np.testing.assert_array_equal(weights.read_tensors(f'{root}/{weights.WEIGHTS_FILE}')['w'],
                                params['w'])
  # metrics.jsonl is rewritten whole in an object store (no appends), resumable like a local one.
  log = metrics.JsonlLog(files.path(root), resume_step=0)
  assert not log.local
  log.write(10, {'train_loss': 2.0})
  log.write(20, {'train_loss': 1.5})
  again = metrics.JsonlLog(files.path(root), resume_step=10)
  again.write(20, {'train_loss': 1.4})
  lines = (gcs / 'bucket' / 'run' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l) for l in lines] == [{'step': 10, 'train_loss': 2.0},
                                           {'step': 20, 'train_loss': 1.4}]


def test_gs_workdir_has_no_lock_and_says_so(gcs, capsys):
  """A cloud workdir cannot be flock'ed: TrainLock takes none, writes no lock file, and says
  that keeping one train per workdir is the user's rule."""
  from rag_jax import workdir as workdir_lib
  files.makedirs('gs://bucket/run')
  with workdir_lib.TrainLock('gs://bucket/run'):
    assert not (gcs / 'bucket' / 'run' / workdir_lib.LOCK_FILE).exists()
  assert ('rag_jax: gs://bucket/run is not on a local disk: no lock keeps a second train out of '
          'it.') in capsys.readouterr().err


def test_tokens_of_a_gs_data_dir_are_cached_on_the_local_disk(monkeypatch, tmp_path):
  """A memory map needs a local file: a cloud data_dir's token cache lies under
  ~/.cache/rag_jax/tokens, one directory per data_dir; a local one's beside its data."""
  from rag_jax.data import pipeline
  monkeypatch.setenv('HOME', str(tmp_path))

  class Builder:
    def __init__(self, data_dir):
      self.data_dir = data_dir
  remote = pipeline._cache_root(Builder('gs://bucket/tfds/tiny_shakespeare/1.0.0'))  # pylint: disable=protected-access
  other = pipeline._cache_root(Builder('gs://bucket/other/1.0.0'))  # pylint: disable=protected-access
  assert os.path.dirname(remote) == str(tmp_path / '.cache' / 'rag_jax' / 'tokens')
  assert remote != other
  assert pipeline._cache_root(Builder('/data/tfds/x/1.0.0')) == '/data/tfds/x/1.0.0/rag_jax_tokens'  # pylint: disable=protected-access


def test_tensorboard_events_to_gs_go_through_epath(gcs):
  import tensorboardX
  writer = tensorboardX.SummaryWriter('gs://bucket/tb')
  writer.add_scalar('loss', 1.0, 1)
  writer.flush()
  writer.close()
  events = list((gcs / 'bucket' / 'tb').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0


def test_the_repository_needs_nothing_outside_it():
  """No tracked file points outside the repository (a fresh clone tests everything)."""
  git = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
  if git.returncode == 0:
    tracked = git.stdout.split()
  else:  # not a git checkout (an exported tree): every file but build and run outputs
    top = lambda d: os.path.relpath(d, ROOT).split(os.sep)[0]
    tracked = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, names in os.walk(ROOT)
               for f in names if top(d) == '.' or not (
                   top(d).startswith('.') or top(d) in ('runs', 'results')
                   or top(d).endswith('.egg-info'))]
  needles = ('..' + '/shared', 'shared' + '/data')  # spelt apart: this file holds no path
  outside = []
  for name in tracked:
    if name.endswith(('.py', '.md', '.toml', '.txt', '.ipynb', '.sh', 'Makefile', '.cfg')) and \
        not name.startswith('rag_jax/data/corpora/'):
      text = (ROOT / name).read_text(errors='replace')
      if any(n in text for n in needles):
        outside.append(name)
  assert outside == []


@pytest.mark.slow
def test_loss_plot_of_several_runs(tmp_path):
  from rag_jax import plot
  for name, scale in (('dense', 1.0), ('ra', 1.1)):
    (tmp_path / name).mkdir()
    rows = [{'step': s, 'train_loss': scale * 4 / s ** 0.3} for s in range(10, 101, 10)]
    rows += [{'step': 100, 'train_loss': 1.0, 'eval_loss': scale * 1.2}]
    (tmp_path / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  out = plot.plot([str(tmp_path / 'dense'), f'file://{tmp_path}/ra'], str(tmp_path / 'loss.png'))
  png = open(out, 'rb').read()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and int.from_bytes(png[16:20], 'big') == 840
  # A scored run adds the panel of loss against compute (a wider picture).
  curve = [{'policy': 'fixed', 'active_fraction': a, 'loss': 1.2 + (1 - a) / 10,
            'flops_per_token': 1e6 * a, 'split': 'validation'} for a in (1.0, 0.5, 0.25)]
  curve += [{'policy': 'fixed', 'active_fraction': 1.0, 'loss': 9.0, 'flops_per_token': 1e6,
             'split': 'test'}]
  (tmp_path / 'ra' / 'eval_curve.json').write_text(json.dumps(curve))
  assert plot.read_curve(str(tmp_path / 'ra')) == {
      'fixed': [(2.5e5, 1.275), (5e5, 1.25), (1e6, 1.2)]}
  png = open(plot.plot([str(tmp_path / 'ra')], str(tmp_path / 'two.png')), 'rb').read()
  assert int.from_bytes(png[16:20], 'big') == 1560
  proc = subprocess.run([sys.executable, '-m', 'rag_jax.plot', f'--workdirs={tmp_path}/dense,'
                         f'{tmp_path}/nothing', f'--out={tmp_path}/b.png'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'nothing/metrics.jsonl does not exist' in proc.stderr
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'b.png').exists()


@pytest.mark.slow
def test_colab_notebook_executes_headless_in_a_checkout(tfds_dir, tmp_path, monkeypatch):
  """The whole notebook, its install cell included (inside a checkout it finds the checkout and
  installs nothing), as `jupyter execute` runs it, in a kernel of this interpreter."""
  import jupytext
  import nbclient
  import nbformat
  path = ROOT / 'notebooks' / 'colab_quickstart.ipynb'
  nb = nbformat.read(path, as_version=4)
  paired = jupytext.read(ROOT / 'notebooks' / 'colab_quickstart.py')
  assert [(c.cell_type, c.source) for c in nb.cells] == \
      [(c.cell_type, c.source) for c in paired.cells], \
      'run jupytext --sync notebooks/colab_quickstart.py'
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')
  monkeypatch.setenv('TFDS_DATA_DIR', tfds_dir)
  monkeypatch.setenv('RAG_COLAB_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  # A kernelspec of this interpreter (the project's venv), not whatever `python3` the machine has.
  spec = tmp_path / 'jupyter' / 'kernels' / 'rag_jax_venv'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'rag_jax venv', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  nbclient.NotebookClient(nb, timeout=600, kernel_name='rag_jax_venv', resources={
      'metadata': {'path': str(path.parent)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'eval_loss' in text and text.count('ROMEO:') == 2 and 'a = 0.5:' in text
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 1
  assert (tmp_path / 'run' / 'loss.png').exists()
