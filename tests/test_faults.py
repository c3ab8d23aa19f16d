"""Faults a run survives with nothing lost: SIGTERM and SIGINT, SIGKILL in the middle of a save,
two `train`s on one workdir, a diverging run, a resume with another config; and every bad path
or file answered by one line, before anything is compiled or written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rag_jax import errors
from rag_jax import runs
from rag_jax import train
from rag_jax import workdir as workdir_lib
from tests.conftest import ROOT, load_config, snapshot

# A smoke run slow enough to signal in the middle (log_every=1: each step is one metrics line).
STEPS = 100
OVERRIDES = dict(num_steps=STEPS, log_every=1, eval_every=50, checkpoint_every=50)


def _config(tfds_dir, base='shakespeare_char', **more):
  config = load_config(base, 'smoke')
  config.update({**OVERRIDES, **more})
  config.data.data_dir = tfds_dir
  return config


def _cli_args(workdir, base='shakespeare_char', **more):
  # One CPU device, as the in-process runs these are compared with exactly (the CLI's default,
  # one device per core, splits the batch: the same losses up to float rounding only).
  more = {'mesh.cpu_devices': 1, **more}
  return [sys.executable, '-m', 'rag_jax.train', f'--config=configs/{base}.py:smoke',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in {**OVERRIDES, **more}.items()]


def _start(cmd, env):
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _params(workdir):
  return runs.load_run(workdir).params


def _wait_for(predicate, proc, timeout=240):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'the run ended first: {proc.communicate()[1][-2000:]}')
    if time.time() - start > timeout:
      raise AssertionError('timed out')
    time.sleep(0.005)


def _logged(workdir, n):
  path = os.path.join(workdir, 'metrics.jsonl')
  return lambda: os.path.exists(path) and sum(1 for _ in open(path)) >= n


def _same_run(workdir, reference):
  """`workdir` ended where the uninterrupted `reference` did: every step's loss, bit for bit,
  and the final parameters."""
  a, b = _metrics(reference), _metrics(workdir)
  assert [r['step'] for r in b] == [r['step'] for r in a] == list(range(1, STEPS + 1))
  assert [r['train_loss'] for r in b] == [r['train_loss'] for r in a]
  assert workdir_lib.latest_step(workdir) == STEPS
  jax.tree.map(np.testing.assert_array_equal, _params(workdir), _params(reference))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tfds_dir):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train_and_evaluate(_config(tfds_dir), workdir)
  return workdir


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_is_exact(reference, tfds_dir, tfds_env, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _start(_cli_args(workdir), tfds_env)
  _wait_for(_logged(workdir, 3), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  step = workdir_lib.latest_step(workdir)
  assert 3 <= step < STEPS
  assert f'stopped by SIGTERM after step {step}; saved the checkpoint of step {step}' in err
  assert 'Traceback' not in err
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]
  train.train_and_evaluate(_config(tfds_dir), workdir)
  _same_run(workdir, reference)


@pytest.mark.slow
def test_sigint_in_the_api_saves_the_step(reference, tfds_dir, tmp_path, monkeypatch):
  """Ctrl-C (a notebook's interrupt) during train_and_evaluate: the step is saved, then
  errors.Interrupted; the run resumes to the uninterrupted result."""
  workdir = str(tmp_path / 'run')
  real = train.data_lib.train_batch
  handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job

  def batch_then_interrupt(tokens, batch_size, block_size, seed, step, rows=None):
    if step == 7:  # while the 8th step's batch is made
      signal.raise_signal(signal.SIGINT)
    return real(tokens, batch_size, block_size, seed, step, rows)

  with monkeypatch.context() as m:
    m.setattr(train.data_lib, 'train_batch', batch_then_interrupt)
    with pytest.raises(errors.Interrupted, match='stopped by SIGINT after step 8; saved the '
                                                 'checkpoint of step 8'):
      train.train_and_evaluate(_config(tfds_dir), workdir)
  assert workdir_lib.latest_step(workdir) == 8
  assert signal.getsignal(signal.SIGINT) is handler  # handlers given back
  train.train_and_evaluate(_config(tfds_dir), workdir)
  _same_run(workdir, reference)


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_a_resumable_workdir(reference, tfds_dir, tfds_env,
                                                          tmp_path, capfd):
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')

  def saving():  # a step folder orbax is still writing, after two complete ones
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    return (sum(n.isdigit() for n in names) >= 2
            and any('.orbax-checkpoint-tmp' in n for n in names))

  for _ in range(5):  # until the kill lands in the middle of a save (almost always at once)
    proc = _start(_cli_args(workdir, checkpoint_every=1), tfds_env)
    _wait_for(saving, proc)
    proc.kill()
    proc.communicate()
    unfinished = [n for n in os.listdir(checkpoints) if '.orbax-checkpoint-tmp' in n]
    if unfinished:
      break
  complete = workdir_lib.latest_step(workdir)
  assert unfinished and complete is not None  # killed while saving
  train.train_and_evaluate(_config(tfds_dir), workdir)  # checkpoint_every may change freely
  err = capfd.readouterr().err
  killed_step = int(unfinished[0].split('.')[0])
  assert f'removed the unfinished checkpoint of step {killed_step}' in err
  assert f'resuming from step {complete}, the newest complete checkpoint' in err
  assert not [n for n in os.listdir(checkpoints) if 'tmp' in n]
  _same_run(workdir, reference)


@pytest.mark.slow
def test_second_train_on_a_workdir_is_refused(reference, tfds_dir, tfds_env, tmp_path,
                                              monkeypatch):
  workdir = str(tmp_path / 'run')
  first = _start(_cli_args(workdir), tfds_env)
  lock = os.path.join(workdir, workdir_lib.LOCK_FILE)

  def locked():
    try:
      with open(lock) as f:
        return json.load(f)['pid'] == first.pid
    except (OSError, ValueError, KeyError):
      return False

  _wait_for(lambda: locked() and workdir_lib.latest_step(workdir) is not None, first)
  first.send_signal(signal.SIGSTOP)  # holds the lock, frozen, while the second run tries
  try:
    assert runs.load_run(workdir).step == 50  # readers need no lock
    with monkeypatch.context() as m:  # in the API: refused before anything compiles
      m.setattr(jax, 'jit', lambda *a, **k: pytest.fail('compiled'))
      with pytest.raises(errors.WorkdirError, match=f'being trained by another rag_jax.train '
                                                    f'\\(pid {first.pid} on '):
        train.train_and_evaluate(_config(tfds_dir), workdir)
    second = subprocess.run(_cli_args(workdir), cwd=ROOT, env=tfds_env, capture_output=True,
                            text=True, timeout=120)
  finally:
    first.send_signal(signal.SIGCONT)
  assert second.returncode == 1
  assert second.stderr.strip().splitlines()[-1].startswith(
      f'error: {workdir} is being trained by another rag_jax.train (pid {first.pid}')
  assert 'Traceback' not in second.stderr
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  _same_run(workdir, reference)  # nothing of the second run is mixed in
  # A holder that died leaves the file but not the lock: the next run goes ahead.
  with workdir_lib.TrainLock(workdir):
    pass


@pytest.mark.slow
def test_diverging_run_saves_no_nan(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(tfds_dir, checkpoint_every=1, log_every=5)
  config.opt.learning_rate = 1e4
  with pytest.raises(FloatingPointError) as info:
    train.train_and_evaluate(config, workdir)
  last_good = workdir_lib.latest_step(workdir)
  assert f'The newest checkpoint in {workdir} is step {last_good}' in str(info.value)
  while (step := workdir_lib.latest_step(workdir)) is not None:  # every step saved is finite
    assert bool(runs.all_finite(_params(workdir))), step
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))


@pytest.mark.slow
def test_divergence_before_any_save_says_so(tfds_dir, tmp_path):
  config = _config(tfds_dir, checkpoint_every=90, log_every=5)
  config.opt.learning_rate = 1e4
  with pytest.raises(FloatingPointError, match='No checkpoint was saved in'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.slow
def test_nan_checkpoint_of_an_older_version_is_refused(reference, tfds_dir, tfds_env, tmp_path):
  """A NaN checkpoint (as versions without the guard could save) is refused by evaluate,
  sample, export and serve (their command lines) and by a resume, with one message, never
  scored as loss=nan; nothing in the workdir changes."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  mngr = workdir_lib.checkpoint_manager(workdir)
  state = mngr.restore(STEPS, args=ocp.args.StandardRestore())
  state['params'] = jax.tree.map(lambda x: x * np.nan, state['params'])
  mngr.save(STEPS + 1, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(errors.WorkdirError, match=f'step {STEPS + 1} .* holds NaN or infinite'):
    runs.load_run(workdir)
  with pytest.raises(errors.WorkdirError, match=f'step {STEPS + 1} .* holds NaN or infinite'):
    train.train_and_evaluate(_config(tfds_dir, num_steps=STEPS + 10), workdir)
  before = snapshot(workdir)
  for args in (['rag_jax.evaluate'], ['rag_jax.sample', '--prompt=ROMEO:', '--num_tokens=4'],
               ['rag_jax.export', f'--out={tmp_path / "sub"}'], ['rag_jax.serve', '--port=0']):
    proc = subprocess.run([sys.executable, '-m', *args, f'--workdir={workdir}'], cwd=ROOT,
                          env=tfds_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.startswith('error: ') and f'step {STEPS + 1}' in proc.stderr
    assert 'holds NaN or infinite' in proc.stderr and 'Traceback' not in proc.stderr, args
  assert snapshot(workdir) == before and not os.path.exists(tmp_path / 'sub')


def test_resume_with_another_config(reference, tfds_dir, tmp_path, no_compile):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  before = snapshot(workdir)
  ra = _config(tfds_dir, base='ra_shakespeare_char', num_steps=STEPS + 10)
  with pytest.raises(errors.WorkdirError, match=(
      r'checkpoint of step 100 trained with another config \(activation.enabled: False in the '
      r'workdir, True now; activation.lam: 0.0 in the workdir, 0.75 now\)')):
    train.train_and_evaluate(ra, workdir)
  other = _config(tfds_dir)
  lr = other.opt.learning_rate
  other.opt.learning_rate = lr / 2
  other.seed = 7
  with pytest.raises(errors.WorkdirError, match=(
      f'opt.learning_rate: {lr!r} in the workdir, {lr / 2!r} now; seed: 0 in the workdir, 7 now')):
    train.train_and_evaluate(other, workdir)
  with pytest.raises(errors.WorkdirError, match='at step 100, beyond config.num_steps=60'):
    train.train_and_evaluate(_config(tfds_dir, num_steps=60), workdir)
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_resume_with_a_changed_config_when_allowed(reference, tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    dense = json.load(f)
  # Growing num_steps needs no flag, and is recorded.
  train.train_and_evaluate(_config(tfds_dir, num_steps=STEPS + 3), workdir)
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    (line,) = [json.loads(l) for l in f]
  assert line == {'step': STEPS, 'time': line['time'], 'changes': {'num_steps': [STEPS, STEPS + 3]},
                  'previous_config': dense}
  # An RA config into the dense workdir, allowed: both configs kept, with the step.
  ra = _config(tfds_dir, base='ra_shakespeare_char', num_steps=STEPS + 5)
  train.train_and_evaluate(ra, workdir, allow_config_change=True)
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    lines = [json.loads(l) for l in f]
  assert len(lines) == 2 and lines[-1]['step'] == STEPS + 3
  assert lines[-1]['changes']['activation.lam'] == [0.0, 0.75]
  assert lines[-1]['previous_config'] == {**dense, 'num_steps': STEPS + 3}
  assert workdir_lib.load_config(workdir).activation.enabled
  assert workdir_lib.latest_step(workdir) == STEPS + 5


def test_short_corpus_is_named_as_short(tfds_dir, tmp_path, no_compile):
  corpus = tmp_path / 'short.txt'
  corpus.write_text('hello world\n')
  config = _config(tfds_dir)
  config.data.dataset, config.data.paths = 'text_files', str(corpus)
  config.data.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(errors.DataError, match=r'the train split has 10 tokens, fewer than '
                                             r'block_size \+ 1 = 33'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # the refused run leaves no workdir behind


@pytest.mark.parametrize('case', ['data_dir_is_a_file', 'paths_name_a_directory',
                                  'checkpoints_is_a_file', 'tokenizer_is_a_directory'])
def test_bad_paths_in_the_api(reference, tfds_dir, tmp_path, no_compile, case):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  config, workdir = _config(tfds_dir), str(tmp_path / 'run')
  if case == 'data_dir_is_a_file':
    config.data.data_dir = str(a_file)
    error, message = errors.DataError, f'config.data.data_dir {a_file} is a file'
  elif case == 'paths_name_a_directory':
    config.data.dataset, config.data.paths = 'text_files', str(tmp_path)
    error, message = errors.DataError, f"'{tmp_path}' is a directory; name its files"
  else:
    shutil.copytree(reference, workdir)
    if case == 'checkpoints_is_a_file':
      path = os.path.join(workdir, 'checkpoints')
      shutil.rmtree(path)
      a_file.rename(path)
      error, message = errors.WorkdirError, f'{path} is a file'
    else:
      path = os.path.join(workdir, 'tokenizer.json')
      os.remove(path)
      os.mkdir(path)
      error, message = errors.WorkdirError, f'{path} is a directory'
    with pytest.raises(error, match=message):
      runs.load_run(workdir)
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, workdir)


def _run_all(cmds, env):
  """Runs the commands side by side; [(returncode, stderr)]."""
  procs = [_start(cmd, env) for cmd in cmds]
  return [(p.returncode, err) for p, (_, err) in ((p, p.communicate(timeout=300)) for p in procs)]


@pytest.mark.slow
def test_bad_paths_and_flags_get_one_line(reference, tfds_env, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a workdir')
  empty = tmp_path / 'empty_config'
  empty.mkdir()
  (empty / 'config.json').write_text('{}')
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(reference, damaged)
  with open(os.path.join(damaged, 'checkpoints', str(STEPS), 'default', 'manifest.ocdbt'), 'w'):
    pass  # empty
  py = sys.executable
  smoke = '--config=configs/shakespeare_char.py:smoke'
  cases = [
      ([py, '-m', 'rag_jax.train', '--config=configs/nope.py', f'--workdir={tmp_path / "x"}'],
       'config file configs/nope.py does not exist'),
      ([py, '-m', 'rag_jax.train', '--config=configs/shakespeare_char.py:nope',
        f'--workdir={tmp_path / "x"}'],
       "configs/shakespeare_char.py: unknown variant 'nope'; the variants are '', 'smoke', 'gpu'"),
      ([py, '-m', 'rag_jax.train', '--config=configs/ra_shakespeare_char.py:nope',
        f'--workdir={tmp_path / "x"}'], "configs/ra_shakespeare_char.py: unknown variant 'nope'"),
      ([py, '-m', 'rag_jax.train', smoke, f'--workdir={a_file}'],
       f'workdir {a_file} is a file, not a directory'),
      ([py, '-m', 'rag_jax.train', smoke, f'--workdir={tmp_path / "x"}',
        '--config.activation.lam=0.5'],
       '--config.activation.lam has no effect: config.activation.enabled is False'),
      ([py, '-m', 'rag_jax.evaluate', f'--workdir={a_file}'],
       f'workdir {a_file} is a file, not a directory'),
      ([py, '-m', 'rag_jax.evaluate', f'--workdir={empty}'],
       'config.json is not the config of a run rag_jax can load'),
      ([py, '-m', 'rag_jax.evaluate', f'--workdir={damaged}'],
       f'the checkpoint of step {STEPS} in {damaged}/checkpoints is damaged: '
       'default/manifest.ocdbt differs from the checksum recorded at save.'),
      (_cli_args(damaged, num_steps=STEPS + 10),
       f'the checkpoint of step {STEPS} in {damaged}/checkpoints is damaged: '
       'default/manifest.ocdbt differs'),
      ([py, '-m', 'rag_jax.evaluate', f'--workdir={reference}', '--active_fractions='],
       '--active_fractions is empty'),
      ([py, '-m', 'rag_jax.evaluate', f'--workdir={reference}', '--policy=random',
        '--active_fractions=0.5'], '--active_fractions goes with --policy=fixed'),
      ([py, '-m', 'rag_jax.evaluate', f'--workdir={reference}', '--policy=random'],
       "--policy=random would score the dense model: this run's config.activation.lam is 0"),
      ([py, '-m', 'rag_jax.sample', f'--workdir={reference}', '--policy=random'],
       "policy random would generate with the dense model"),
  ]
  before = snapshot(reference)
  for (rc, err), (cmd, message) in zip(_run_all([c for c, _ in cases], tfds_env), cases):
    lines = err.strip().splitlines()
    assert rc == 1 and lines and lines[-1].startswith('error: '), (cmd, err[-3000:])
    assert message in lines[-1], (cmd, err[-3000:])
    assert 'Traceback' not in err and 'Event loop is closed' not in err, (cmd, err[-3000:])
  assert snapshot(reference) == before
  assert not os.path.exists(tmp_path / 'x')


@pytest.mark.slow
def test_unwritable_workdir_is_refused_before_the_work(reference, tfds_env, tmp_path):
  workdir = str(tmp_path / 'readonly')
  shutil.copytree(reference, workdir)
  cmd = [sys.executable, '-m', 'rag_jax.evaluate', f'--workdir={workdir}']
  if os.geteuid() == 0:  # root writes anywhere: run as nobody (who can read the tree)
    if shutil.which('setpriv') is None:
      pytest.skip('running as root without setpriv')
    cmd = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] + cmd
    for d in [tmp_path, *tmp_path.parents][:-1]:  # up to /, which is readable already
      os.chmod(d, os.stat(d).st_mode | 0o005)
  os.chmod(workdir, 0o555)
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=tfds_env, capture_output=True, text=True,
                          timeout=120)
  finally:
    os.chmod(workdir, 0o755)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f'error: cannot write into workdir {workdir} (Permission denied); nothing was done')
  assert not os.path.exists(os.path.join(workdir, 'eval_curve.json'))


def test_train_writes_only_into_a_workdir_of_its_own(reference, tfds_dir, tmp_path, no_compile):
  """A directory holding someone else's files (a Hugging Face model folder, notes), or a workdir
  whose checkpoints were moved away but whose config.json is another run's, is refused with
  one line before anything is written into it."""
  model = tmp_path / 'hf_model'
  model.mkdir()
  (model / 'config.json').write_text('{"model_type": "gpt2", "n_layer": 2}')
  (model / 'model.safetensors').write_bytes(b'weights')
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'todo.txt').write_text('mine')
  cases = [(model, r'is not a rag_jax workdir \(a config.json that is not a rag_jax run config; '
                   r'it holds config.json, model.safetensors\)'),
           (notes, r'is not a rag_jax workdir \(no rag_jax run; it holds todo.txt\)')]
  run = tmp_path / 'run'
  shutil.copytree(reference, run)
  shutil.move(run / 'checkpoints', tmp_path / 'moved_checkpoints')
  cases.append((run, r'holds the config of another run \(seed differ\) and no checkpoint'))
  for directory, message in cases:
    before = snapshot(directory)
    with pytest.raises(errors.WorkdirError, match=message):
      train.train_and_evaluate(_config(tfds_dir, seed=7), str(directory))
    assert snapshot(directory) == before, directory


@pytest.mark.slow
def test_a_workdir_older_than_the_marker_is_still_ours(reference, tfds_dir, tmp_path):
  """Runs written before workdirs carried MARKER_FILE resume as before (the marker is added)."""
  old = tmp_path / 'old'
  shutil.copytree(reference, old)
  os.remove(old / workdir_lib.MARKER_FILE)
  train.train_and_evaluate(_config(tfds_dir, num_steps=STEPS + 2), str(old))
  assert (old / workdir_lib.MARKER_FILE).exists() and _metrics(str(old))[-1]['step'] == STEPS + 2
