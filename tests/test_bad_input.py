"""Each bad input stops with one message naming the problem, before compiling, saving nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from rag_jax.data import pipeline as data
from rag_jax import errors
from rag_jax import train
from tests.conftest import ROOT, snapshot


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', -4, 'config.batch_size must be a positive integer, got -4'),
    ('model.num_layers', 0, 'config.model.num_layers must be a positive integer'),
    ('model.embed_dim', 34, r'num_heads \(4\) must divide config.model.embed_dim \(34\)'),
    ('model.dropout', 1.5, r'config.model.dropout must be in \[0, 1\)'),
    ('opt.learning_rate', -1.0, 'config.opt.learning_rate must be a non-negative number'),
    ('opt.warmup_steps', 60, r'warmup_steps \(60\) must be smaller than config.num_steps'),
    ('data.tokenizer', 'wordpiece', 'config.data.tokenizer must be one of'),
    ('data.tokenizer', 'bpe', r"tokenizer='bpe' trains .*vocab_size must be an integer above 257"),
    ('init_reorder', True, 'config.init_reorder reorders the model config.init_from names'),
    ('model.gelu', 'relu', "config.model.gelu must be one of \\('exact', 'tanh'\\)"),
    ('mesh.data', 64, 'config.mesh.data=64 but only'),
    # NaN and infinities pass range checks written as comparisons: every float field refuses them.
    ('opt.learning_rate', float('nan'), 'config.opt.learning_rate must be a finite number'),
    ('activation.alpha', float('nan'), 'config.activation.alpha must be a finite number'),
    ('activation.lam', float('inf'), 'config.activation.lam must be a finite number, got inf'),
    ('opt.b2', float('-inf'), 'config.opt.b2 must be a finite number'),
    ('model.dropout', float('nan'), 'config.model.dropout must be a finite number'),
])
def test_bad_config_values(smoke_config, tmp_path, no_compile, field, value, message):
  section, _, name = field.rpartition('.')
  target = smoke_config[section] if section else smoke_config
  with target.ignore_type():
    target[name] = value
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_wrong_type_in_python_config(smoke_config, tmp_path, no_compile):
  with smoke_config.ignore_type():
    smoke_config.batch_size = '12'
  with pytest.raises(errors.ConfigError, match="batch_size must be a positive integer, got '12'"):
    train.train_and_evaluate(smoke_config, str(tmp_path))


def test_missing_dataset_file(smoke_config, tmp_path, no_compile):
  smoke_config.data.dataset = 'text_files'
  smoke_config.data.paths = str(tmp_path / 'missing.txt')
  with pytest.raises(data.DataError, match='missing.txt.*matches no file'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))


@pytest.fixture(scope='module')
def good_run(tmp_path_factory, tfds_dir):
  from tests.conftest import load_config
  config = load_config('shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  config.num_steps = 20
  config.checkpoint_every = 10
  workdir = str(tmp_path_factory.mktemp('good'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_workdir_of_a_different_model(good_run, tmp_path, no_compile):
  config, workdir = good_run
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  before = snapshot(run)
  other = config.copy_and_resolve_references()
  other.model.embed_dim = 64
  with pytest.raises(errors.WorkdirError,
                     match=r'different model \(model.embed_dim: 32 in the workdir, 64 now\)'):
    train.train_and_evaluate(other, run)
  assert snapshot(run) == before


def _array_files(run, step):
  return [os.path.join(root, f) for root, _, names in os.walk(os.path.join(run, 'checkpoints',
                                                                           str(step)))
          if os.path.basename(root) == 'd' for f in names]  # the array data files


def test_damaged_checkpoint(good_run, tmp_path):
  """Garbage in a checkpoint's files: named as damaged by its checksums; in a run without
  checksum records (older than them), by orbax's failed restore."""
  config, workdir = good_run
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  assert sorted(os.listdir(os.path.join(run, 'checksums'))) == ['10.json', '20.json']
  for path in _array_files(run, 20):
    with open(path, 'wb') as fh:
      fh.write(b'garbage')
  before = snapshot(run)
  with pytest.raises(errors.WorkdirError, match=r'checkpoint of step 20 in .* is damaged: '
                     r'default/.*d/[0-9a-f]+ differs from the checksum recorded at save '
                     r'\(\d+ files in all\). Move .*Nothing was changed'):
    train.train_and_evaluate(config, run)
  assert snapshot(run) == before
  shutil.rmtree(os.path.join(run, 'checksums'))
  before = snapshot(run)
  with pytest.raises(errors.WorkdirError,
                     match='checkpoint of step 20 .* cannot be restored.*Nothing was changed'):
    train.train_and_evaluate(config, run)
  assert snapshot(run) == before


def test_flipped_bytes_are_named_by_every_reader(good_run, tmp_path):
  """Bytes flipped in place (same size) restore without complaint from orbax; the checksums
  recorded at save name the checkpoint as damaged for a resume, evaluate and sample alike."""
  from rag_jax import runs
  config, workdir = good_run
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  with open(os.path.join(run, 'checksums', '20.json')) as f:
    recorded = json.load(f)
  step_dir = os.path.join(run, 'checkpoints', '20')
  assert set(recorded) == {os.path.relpath(os.path.join(r, n), step_dir)
                           for r, _, names in os.walk(step_dir) for n in names}
  target = max(_array_files(run, 20), key=os.path.getsize)
  with open(target, 'r+b') as fh:
    fh.seek(os.path.getsize(target) // 2)
    byte = fh.read(1)
    fh.seek(-1, 1)
    fh.write(bytes([byte[0] ^ 0xFF]))
  before = snapshot(run)
  message = (f'is damaged: {os.path.relpath(target, step_dir)} differs from the checksum '
             'recorded at save')
  with pytest.raises(errors.WorkdirError, match=message):
    runs.load_run(run)  # what evaluate, sample, export, search and serve load with
  with pytest.raises(errors.WorkdirError, match=message):
    train.train_and_evaluate(config, run)
  assert snapshot(run) == before


def _cli(module, *args, env):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_unknown_field_and_wrong_type(tfds_env, tmp_path):
  base = ['--config=configs/shakespeare_char.py:smoke', f'--workdir={tmp_path}']
  proc = _cli('rag_jax.train', *base, '--config.model.heads=3', env=tfds_env)
  assert proc.returncode != 0
  assert "--config.model.heads: the config has no field 'heads'" in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = _cli('rag_jax.train', *base, '--config.activation.alhpa=1', env=tfds_env)
  assert ("--config.activation.alhpa: the config has no field 'alhpa' (did you mean 'alpha'?)"
          in proc.stderr), proc.stderr
  proc = _cli('rag_jax.train', *base, '--config.batch_size=many', env=tfds_env)
  assert proc.returncode != 0
  assert 'flag --config.batch_size=many' in proc.stderr and 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.slow
def test_cli_prompt_errors(good_run, tfds_env):
  _, workdir = good_run
  proc = _cli('rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO: ☃', env=tfds_env)
  assert proc.returncode != 0 and "does not know: '☃'" in proc.stderr
  proc = _cli('rag_jax.sample', f'--workdir={workdir}', '--prompt=' + 'a' * 40, env=tfds_env)
  assert proc.returncode != 0 and "40 tokens but the model's context is 32" in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_cli_evaluate_and_sample(good_run, tfds_env):
  _, workdir = good_run
  proc = _cli('rag_jax.evaluate', f'--workdir={workdir}', '--split=test', env=tfds_env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, 'eval_curve.json')) as f:
    curve = json.load(f)
  assert len(curve) == 1
  entry = curve[0]
  assert {'active_fraction', 'policy', 'loss', 'bits_per_token', 'flops_per_token'} <= entry.keys()
  assert entry['active_fraction'] == 1.0 and entry['policy'] == 'fixed'
  assert abs(entry['bits_per_token'] * 0.6931471805599453 - entry['loss']) < 1e-9
  proc = _cli('rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO:', '--num_tokens=50',
              '--seed=3', env=tfds_env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('ROMEO:') and 'tokens/s' in proc.stdout
  again = _cli('rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO:', '--num_tokens=50',
               '--seed=3', env=tfds_env)
  assert again.stdout.split('-' * 40)[0] == proc.stdout.split('-' * 40)[0]


def test_run_config_overrides(good_run):
  """runs.load_run applies `--config.*` overrides to a saved run, and refuses the ones that would
  not fit its parameters or the config's fields, before restoring anything."""
  from rag_jax import runs
  _, workdir = good_run
  before = snapshot(workdir)
  run = runs.load_run(workdir, {'dtype': 'bfloat16', 'eval_batches': 2})
  assert run.config.dtype == 'bfloat16' and run.config.eval_batches == 2
  assert run.model.cfg.dtype == 'bfloat16'
  assert runs.load_run(workdir).config.dtype == 'float32'  # the saved config is unchanged
  with pytest.raises(errors.ConfigError, match=r'--config.model.num_heads: a saved run.s '
                     r'parameters keep their shapes'):
    runs.load_run(workdir, {'model.num_heads': 2, 'dtype': 'bfloat16'})
  with pytest.raises(errors.ConfigError, match='the config has no field `model.heads`'):
    runs.load_run(workdir, {'model.heads': 2})
  with pytest.raises(errors.ConfigError, match='config.model.dropout must be in'):
    runs.load_run(workdir, {'model.dropout': 2.0})
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_cli_config_overrides_on_a_saved_run(good_run, tfds_env):
  """The tools that read a workdir take `--config.FIELD=VALUE` as `train` does."""
  config, workdir = good_run
  proc = _cli('rag_jax.evaluate', f'--workdir={workdir}', '--split=test',
              '--config.eval_batches=1', '--config.dtype=bfloat16', env=tfds_env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, 'eval_curve.json')) as f:
    entry = [e for e in json.load(f) if e['split'] == 'test'][-1]
  assert entry['tokens'] == config.eval_batch_size * config.model.block_size  # one batch
  proc = _cli('rag_jax.sample', f'--workdir={workdir}', '--prompt=ROMEO:', '--num_tokens=8',
              '--config.dtype=bfloat16', env=tfds_env)
  assert proc.returncode == 0 and proc.stdout.startswith('ROMEO:'), proc.stderr[-2000:]
  before = snapshot(workdir)
  for args, message in (
      (['--config.model.num_heads=2'], 'error: --config.model.num_heads: a saved run'),
      (['--config.model.heads=2'], "error: --config.model.heads: the config has no field 'heads'"),
      (['--config.dtype=float8'], 'error: config.dtype must be one of'),
      (['--policy=adaptive', '--escalation_shares=0.2'],
       'error: --escalation_shares needs a learned router (--router)'),
      (['--policy=adaptive', '--escalation_shares=0.2,x'],
       "error: --escalation_shares must be numbers, got '0.2,x'")):
    proc = _cli('rag_jax.evaluate', f'--workdir={workdir}', *args, env=tfds_env)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  assert snapshot(workdir) == before


@pytest.fixture
def offline(monkeypatch):
  """No host answers (socket.create_connection fails at once); the probe's cache is cleared
  before and after, so no other test sees this one's answers."""
  import socket
  from rag_jax import files
  probed = []

  def unreachable(address, timeout=None):
    probed.append(address)
    raise OSError('Network is unreachable')
  monkeypatch.setattr(socket, 'create_connection', unreachable)
  files.unreachable.cache_clear()
  yield probed
  files.unreachable.cache_clear()


def test_unreachable_cloud_paths_are_one_line(offline, smoke_config, tmp_path, no_compile):
  from rag_jax import workdir as workdir_lib
  cause = ('cannot be reached (OSError: Network is unreachable); check the network, or use a '
           'local path.')
  with pytest.raises(errors.WorkdirError) as e:
    workdir_lib.check_readable('gs://bucket/run')
  assert str(e.value) == f'gs://bucket/run: storage.googleapis.com {cause}'
  with pytest.raises(errors.WorkdirError, match='^gs://bucket/run2: storage.googleapis.com'):
    train.train_and_evaluate(smoke_config, 'gs://bucket/run2')
  with pytest.raises(errors.WorkdirError, match='^s3://bucket/plan.json: s3.amazonaws.com'):
    workdir_lib.check_output_file('s3://bucket/plan.json')
  smoke_config.data.data_dir = 'gs://bucket/tfds'
  with pytest.raises(data.DataError) as e:
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert str(e.value) == f'data_dir gs://bucket/tfds: storage.googleapis.com {cause}'
  assert offline == [('storage.googleapis.com', 443), ('s3.amazonaws.com', 443)]  # once each
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_cloud_path_that_cannot_be_looked_up_is_one_line(monkeypatch):
  """A store that answers but refuses the path (no credentials, no bucket): TensorFlow's or
  fsspec's own error becomes one OSError naming the path."""
  from rag_jax import files

  def refuse(self):
    raise RuntimeError('Error executing an HTTP request: 401 no credentials\n when reading gs://b')
  monkeypatch.setattr(files, 'ENDPOINTS', {})
  monkeypatch.setattr(type(files.path('gs://b/run')), 'exists', refuse)
  with pytest.raises(OSError) as e:
    files.check_reachable('gs://b/run')
  assert str(e.value) == ('gs://b/run: cannot be looked up (RuntimeError: Error executing an HTTP '
                          'request: 401 no credentials).')
  files.check_reachable('/local/path/not/even/there')  # local paths pass untouched


@pytest.mark.slow
def test_evaluate_workdir_without_checkpoint(tmp_path, tfds_env):
  proc = _cli('rag_jax.evaluate', f'--workdir={tmp_path}', env=tfds_env)
  assert proc.returncode != 0 and 'config.json does not exist' in proc.stderr


def test_non_finite_flags_are_named():
  """Every float flag and list flag of numbers of the package's CLIs (cli.parse_flags)."""
  from absl import flags
  from rag_jax import cli
  fv = flags.FlagValues()
  flags.DEFINE_float('temperature', 0.8, '', flag_values=fv)
  flags.DEFINE_list('active_fractions', ['1.0'], '', flag_values=fv)
  flags.DEFINE_list('workdirs', None, '', flag_values=fv)
  fv(['prog', '--workdirs=nan_run,other'])  # not numbers: left alone
  assert cli.non_finite_flag(fv) is None
  fv(['prog', '--temperature=nan'])
  assert cli.non_finite_flag(fv) == '--temperature=nan: must be a finite number.'
  fv(['prog', '--temperature=0.5', '--active_fractions=1,inf'])
  assert cli.non_finite_flag(fv) == '--active_fractions=1,inf: must be a finite number.'


def test_every_package_cli_parses_flags_through_cli():
  for module in ('train', 'evaluate', 'sample', 'export', 'search', 'convert', 'plot'):
    source = (ROOT / 'rag_jax' / f'{module}.py').read_text()
    assert 'app.run(main, flags_parser=cli.parse_flags)' in source, module


@pytest.mark.parametrize('argv,message', [
    (['rag_jax.sample', '--workdir=W', '--temperature=nan'], '--temperature=nan'),
    (['rag_jax.evaluate', '--workdir=W', '--policy=random', '--alpha=nan'], '--alpha=nan'),
    (['rag_jax.evaluate', '--workdir=W', '--active_fractions=1,inf'], '--active_fractions=1,inf'),
])
@pytest.mark.slow
def test_cli_refuses_non_finite_flags_in_one_line(tfds_env, tmp_path, argv, message):
  argv = [a.replace('=W', f'={tmp_path}') for a in argv]
  proc = _cli(*argv, env=tfds_env)
  assert proc.returncode == 1
  assert proc.stderr.strip() == f'error: {message}: must be a finite number.', proc.stderr


@pytest.mark.slow
def test_output_locations_are_checked_before_the_work(tfds_env, tmp_path):
  """search and plot check --out before they compute (its directory made when missing)."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('mine')
  proc = _cli('rag_jax.search', f'--workdir={tmp_path / "no_run"}',
              f'--out={blocker}/plan.json', env=tfds_env)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith(f'error: cannot write --out {blocker}/plan.json'), \
      proc.stderr
  assert blocker.read_text() == 'mine'
  proc = _cli('rag_jax.plot', f'--workdirs={tmp_path / "no_run"}', f'--out={tmp_path}',
              env=tfds_env)
  assert proc.returncode == 1 and proc.stderr.strip() == \
      f'error: --out {tmp_path} is a directory; give a file name.', proc.stderr
  proc = _cli('rag_jax.plot', '--workdirs=', f'--out={tmp_path / "x.png"}', env=tfds_env)
  assert proc.returncode == 1 and 'names no run' in proc.stderr
  assert not (tmp_path / 'x.png').exists()
  # A missing directory is made before the work, which then fails on its own input.
  proc = _cli('rag_jax.plot', f'--workdirs={tmp_path / "no_run"}',
              f'--out={tmp_path / "new" / "dir" / "loss.png"}', env=tfds_env)
  assert proc.returncode == 1 and (tmp_path / 'new' / 'dir').is_dir()
  assert 'no_run' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_dense_run_scores_at_full_width_whatever_its_unused_activation_settings(good_run):
  """A dense run's activation settings matter only when it is scored narrower: buckets that do
  not divide its heads do not stop `evaluate` at a = 1, and are refused at a = 0.5."""
  from rag_jax import evaluate
  _, workdir = good_run
  (entry,) = evaluate.evaluate(workdir, (1.0,), overrides={'buckets': 3})
  assert entry['active_fraction'] == 1.0
  with pytest.raises(errors.ConfigError, match='buckets=3 does not divide'):
    evaluate.evaluate(workdir, (0.5,), overrides={'buckets': 3})


def test_experiment_scripts_check_out_before_the_work(tmp_path, tfds_env):
  """Every script under experiments/ that writes --out parses its flags with
  cli.parse_flags_with_output; one run shows the check lands before any measurement."""
  import re
  scripts = sorted((ROOT / 'experiments').glob('*.py'))
  writers = [p for p in scripts if "DEFINE_string('out'" in p.read_text()]
  assert len(writers) >= 15
  for path in writers:
    assert re.search(r'app\.run\(main, flags_parser=cli\.parse_flags_with_output\)',
                     path.read_text()), path.name
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  proc = subprocess.run([sys.executable, 'experiments/bench_sample.py',
                         f'--out={a_file}/result.json'], cwd=ROOT, env=tfds_env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == (f'error: cannot write --out {a_file}/result.json: {a_file} is a '
                                 'file; nothing was done.')
  assert a_file.read_text() == 'mine'


def test_a_run_saved_before_the_added_fields_loads_and_resumes(good_run, tmp_path):
  """configuration.ADDED_FIELDS: a config.json written before those fields existed is completed
  with the values that give its old behaviour; evaluate's loader and a resume accept it."""
  from rag_jax import configuration, runs
  config, workdir = good_run
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  path = os.path.join(run, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  removed = []
  for dotted in configuration.ADDED_FIELDS:
    *parents, leaf = dotted.split('.')
    node = saved
    for part in parents:
      node = node[part]
    if leaf in node:
      del node[leaf]
      removed.append(dotted)
  assert {'init_from', 'model.gelu', 'wandb'} <= set(removed) and len(removed) >= 8
  with open(path, 'w') as f:
    json.dump(saved, f)
  loaded = runs.load_run(run).config
  for dotted in removed:
    want = configuration.ADDED_FIELDS[dotted]
    got = configuration.get(loaded, dotted)
    assert (got.to_dict() if hasattr(got, 'to_dict') else got) == want, dotted
  train.train_and_evaluate(config, run)  # a resume: no field reported as changed
