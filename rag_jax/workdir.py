"""What a run leaves in its workdir, and reading it back safely.

    DIR/config.json      the full config of the run
    DIR/tokenizer.json   the tokenizer built from the train split
    DIR/metrics.jsonl    one JSON object per logged step
    DIR/eval_curve.json  written by rag_jax.evaluate
    DIR/checkpoints/     orbax CheckpointManager steps
    DIR/events.*         TensorBoard
    DIR/train.lock       held by the one `train` that writes DIR (who holds it, inside)
    DIR/config_changes.jsonl  one line per resume that changed the config: the step, the
                         fields that changed and the config before it
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging as python_logging
import os
import re
import socket
import sys
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from rag_jax import configuration
from rag_jax import files
from rag_jax.errors import ConfigError, WorkdirError

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'
METRICS_FILE = 'metrics.jsonl'
EVAL_CURVE_FILE = 'eval_curve.json'
EVAL_TABLE_FILE = 'eval_table.txt'  # evaluate's last table, as it printed it
CHECKPOINT_DIR = 'checkpoints'
# sha256 of every file of each complete checkpoint, written when it is complete (CHECKSUM_DIR/
# STEP.json) and checked before it is restored: a damaged file is named as damaged (bytes flipped
# on disk restore without complaint and only show up as a diverged loss). Local workdirs only
# (cloud stores check their objects' integrity themselves).
CHECKSUM_DIR = 'checksums'
LOCK_FILE = 'train.lock'
# Written by train into every workdir it makes: what says a directory is ours to write into.
MARKER_FILE = 'rag_jax_workdir.json'
WORKDIR_FORMAT = 1
# A run config.json's own fields: a workdir of a run older than MARKER_FILE is one whose
# config.json has them.
_RUN_FIELDS = {'model', 'activation', 'opt', 'data', 'num_steps'}
CONFIG_CHANGES_FILE = 'config_changes.jsonl'
# A step folder orbax was still writing: `<step>.orbax-checkpoint-tmp-<timestamp>` (local disks;
# object stores mark a finished step with commit_success.txt instead).
_UNFINISHED = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')


def quiet_logs() -> None:
  """Keeps absl INFO lines (orbax logs every save) off the terminal of the CLIs."""
  logging.set_verbosity(logging.WARNING)


def root_keys(seed: int) -> dict[str, jax.Array]:
  """The root key of a run, split once by purpose (docs/design.md §5)."""
  init, train, sample = jax.random.split(jax.random.key(seed), 3)
  return {'init': init, 'train': train, 'sample': sample}


def notice(text: str) -> None:
  """A line for the user on stderr (process 0 only): what a command did on its own."""
  if jax.process_index() == 0:
    print(f'rag_jax: {text}', file=sys.stderr, flush=True)


def _check_layout(workdir: str) -> None:
  """The names a run uses hold what they should (a file where a directory belongs, or the
  other way round, would fail deep inside orbax or json)."""
  for name in (CHECKPOINT_DIR,):
    path = os.path.join(workdir, name)
    if files.exists(path) and not files.isdir(path):
      raise WorkdirError(f'{path} is a file; it should be the directory of the orbax checkpoints. '
                         'Move it away.')
  for name in (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE, EVAL_CURVE_FILE, CONFIG_CHANGES_FILE,
               LOCK_FILE):
    path = os.path.join(workdir, name)
    if files.isdir(path):
      raise WorkdirError(f'{path} is a directory; it should be a file. Move it away.')


def check_reachable(path: str) -> None:
  """A cloud path whose store does not answer, or refuses it: one WorkdirError (files)."""
  try:
    files.check_reachable(path)
  except OSError as e:
    raise WorkdirError(str(e)) from None


def check_readable(workdir: str) -> None:
  """A workdir to read: an existing directory, or one WorkdirError."""
  check_reachable(workdir)
  if not files.exists(workdir):
    raise WorkdirError(f'workdir {workdir} does not exist; give the --workdir of a run written by '
                       'rag_jax.train.')
  if not files.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} is a file, not a directory; give the --workdir of a '
                       'run written by rag_jax.train.')
  _check_layout(workdir)


def _probe_write(directory: str) -> None:
  """Writes and removes an empty file of this process's own in `directory` (OSError if not)."""
  probe = os.path.join(directory, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
  files.write_bytes(probe, b'')
  files.remove(probe)


def check_writable(workdir: str, create: bool = False) -> None:
  """A workdir to write into: a directory (made when `create`) where a file can be written,
  checked before any work so that no result is computed and then lost. One WorkdirError."""
  check_reachable(workdir)
  if files.exists(workdir) and not files.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} is a file, not a directory; give a new or existing '
                       'directory.')
  if create:
    try:
      files.makedirs(workdir)
    except OSError as e:
      raise WorkdirError(f'cannot create workdir {workdir} ({e.strerror}).') from None
  try:
    _probe_write(workdir)
  except OSError as e:
    raise WorkdirError(f'cannot write into workdir {workdir} ({e.strerror}); nothing was done. '
                       'Give a directory you can write to.') from None
  _check_layout(workdir)


def claim(workdir: str, config: ml_collections.ConfigDict, mark: bool = True) -> None:
  """Before `train` writes into `workdir`: it must be new or empty, or a rag_jax workdir (its
  MARKER_FILE, or an older run's config.json), and a workdir without checkpoints must not hold
  another run's config (its config.json, metrics and events would be replaced). One
  WorkdirError naming what was found; otherwise the marker is written (when `mark`)."""
  marker = os.path.join(workdir, MARKER_FILE)
  entries = sorted(e for e in files.listdir(workdir)
                   if not e.startswith('.write_probe') and e != LOCK_FILE)
  if entries and not files.exists(marker):
    saved = None
    try:
      saved = files.read_json(os.path.join(workdir, CONFIG_FILE))
    except (OSError, ValueError):
      pass
    if not (isinstance(saved, dict) and _RUN_FIELDS <= saved.keys()):
      shown = ', '.join(entries[:5]) + (f' and {len(entries) - 5} more' if len(entries) > 5
                                        else '')
      what = (f'a {CONFIG_FILE} that is not a rag_jax run config' if CONFIG_FILE in entries
              else 'no rag_jax run')
      raise WorkdirError(f'{workdir} is not a rag_jax workdir ({what}; it holds {shown}); train '
                         'writes only into a new or empty directory or a workdir of its own. '
                         'Give another --workdir.')
  if latest_step(workdir) is None and files.exists(os.path.join(workdir, CONFIG_FILE)):
    changes = configuration.diff(load_config(workdir), config)
    if changes:
      fields = ', '.join(list(changes)[:4]) + (' ...' if len(changes) > 4 else '')
      raise WorkdirError(f'{workdir} holds the config of another run ({fields} differ) and no '
                         'checkpoint: training here would replace its config.json, metrics and '
                         'events. Use a new --workdir (or move those files away too).')
  if mark:
    mark_workdir(workdir)


def mark_workdir(workdir: str, by: str = 'rag_jax.train') -> None:
  """Writes MARKER_FILE into `workdir` unless it is there (a tool that makes a workdir for
  train, such as a sweep writing its log there, marks it first)."""
  marker = os.path.join(workdir, MARKER_FILE)
  if not files.exists(marker):
    files.write_json(marker, {'format': WORKDIR_FORMAT, 'written_by': by})


def remove_if_unused(workdir: str) -> None:
  """Removes a workdir this train made when it holds nothing but its lock and marker (the run
  was refused before it saved anything)."""
  own = {LOCK_FILE, MARKER_FILE}
  try:
    entries = set(files.listdir(workdir))
    if entries <= own:
      for name in entries:
        files.remove(os.path.join(workdir, name))
      files.path(workdir).rmdir()
  except OSError:
    pass


def check_output_file(path: str) -> None:
  """A file a command will write when its work is done, checked before the work: not a
  directory, its directory made if missing, and writable there. One WorkdirError."""
  check_reachable(path)
  if files.isdir(path):
    raise WorkdirError(f'--out {path} is a directory; give a file name.')
  parent = os.path.dirname(path.rstrip('/')) or '.'
  if files.exists(parent) and not files.isdir(parent):
    raise WorkdirError(f'cannot write --out {path}: {parent} is a file; nothing was done.')
  try:
    files.makedirs(parent)
    _probe_write(parent)
  except OSError as e:
    raise WorkdirError(f'cannot write --out {path} ({e.strerror or e}); nothing was done. Give a '
                       'path you can write to.') from None


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  files.write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json, checked: a WorkdirError when it is missing, damaged, or not the
  config of a run (e.g. `{}`)."""
  check_readable(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    saved = files.read_json(path)
  except FileNotFoundError:
    raise WorkdirError(
        f'{path} does not exist; is {workdir} a workdir written by rag_jax.train?') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{path} is damaged ({e}).') from None
  if not isinstance(saved, dict):
    raise WorkdirError(f'{path} holds {type(saved).__name__}, not a run config.')
  config = configuration.complete(ml_collections.ConfigDict(saved))
  try:
    configuration.validate(config)
  except ConfigError as e:
    raise WorkdirError(f'{path} is not the config of a run rag_jax can load: {e}') from None
  return config


def check_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 workdir: str, step: int, allow_change: bool = False) -> dict[str, tuple]:
  """The config a run resumes with must describe the checkpoint of `step` it resumes from.

  The shapes of the model and the data (configuration.SHAPE_FIELDS) never change. Any other field
  outside configuration.RESUME_FREE_FIELDS (the activation, the optimizer, the data, the seed,
  the dtype, ...) is refused with the fields that differ, unless `allow_change`; `num_steps`
  may grow, never below `step`. Returns the changes ({field: (old, new)}), for
  `record_config_change`.
  """
  changes = configuration.diff(saved, config)
  shape = [f'{k}: {old!r} in the workdir, {new!r} now' for k, (old, new) in changes.items()
           if k in configuration.SHAPE_FIELDS]
  if shape:
    raise WorkdirError(
        f'{workdir} holds a checkpoint of a different model ({"; ".join(shape)}). '
        'Use a new --workdir, or move its checkpoints/ away to start over.')
  if config.num_steps < step:
    raise WorkdirError(f'{workdir} is at step {step}, beyond config.num_steps={config.num_steps}; '
                       'give a num_steps of at least the step reached.')
  free = lambda name: any(name == f or name.startswith(f + '.')
                          for f in configuration.RESUME_FREE_FIELDS)
  refused = {k: v for k, v in changes.items() if not free(k)
             and not (k == 'num_steps' and v[1] >= v[0])}
  if refused and not allow_change:
    listed = '; '.join(f'{k}: {old!r} in the workdir, {new!r} now' for k, (old, new) in
                       list(refused.items())[:6])
    more = f' (and {len(refused) - 6} more)' if len(refused) > 6 else ''
    raise WorkdirError(
        f'{workdir} holds a checkpoint of step {step} trained with another config ({listed}'
        f'{more}). Resume with the config of the run, or pass --allow_config_change to go on '
        'with this one (both are kept; config_changes.jsonl records the step), or use a new '
        '--workdir. Nothing was changed.')
  return changes


def record_config_change(workdir: str, step: int, saved: ml_collections.ConfigDict,
                         changes: dict[str, tuple]) -> None:
  """Appends a line to config_changes.jsonl: the step of the change, the changed fields
  and the whole config before it (the new one becomes config.json)."""
  if not changes or jax.process_index() != 0:
    return
  line = {'step': step, 'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'), 'changes': {k: list(v) for k, v in changes.items()},
          'previous_config': configuration.as_json(saved)}
  path = os.path.join(workdir, CONFIG_CHANGES_FILE)
  old = ''
  if files.exists(path):
    old = files.read_text(path)
  files.write_text(path, old + json.dumps(line) + '\n')


class TrainLock:
  """The one writer of a workdir: an exclusive `flock` on DIR/train.lock for the run's life.

  The kernel drops the lock when its holder exits, however it exits (a crash, SIGKILL), so a
  stale file never blocks a run; the file names the holder (pid, host, start time, command)
  for the message a second `train` gets. Readers (`evaluate`, `sample`) take no lock. Needs a
  file system with flock (local disks, most NFS); see docs/design.md §9. A cloud workdir
  (gs://...) has no such lock: there the one-writer rule is the user's (a notice says so).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self.fd = None

  def __enter__(self) -> 'TrainLock':
    if not files.is_local(self.path):
      notice(f'{self.workdir} is not on a local disk: no lock keeps a second train out of it.')
      return self
    fd = os.open(files.local(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
      except (ValueError, UnicodeDecodeError):
        holder = {}
      os.close(fd)
      who = (f"pid {holder.get('pid')} on {holder.get('host')}, started "
             f"{holder.get('started')}: {holder.get('command')}") if holder else 'unknown'
      raise WorkdirError(
          f'{self.workdir} is being trained by another rag_jax.train ({who}). One run writes a '
          'workdir at a time: wait for it or stop it (it saves on SIGTERM), or use another '
          '--workdir. evaluate and sample may read it meanwhile.') from None
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'command': ' '.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self.fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


def remove_unfinished_checkpoints(workdir: str) -> list[int]:
  """Deletes the step folders a killed run left half-written (orbax writes a step into a
  temporary folder and renames it when complete); returns their steps. Process 0 only."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  if jax.process_index() != 0 or not files.isdir(root):
    return []
  steps = []
  for name in sorted(files.listdir(root)):
    found = _UNFINISHED.match(name)
    if found:
      try:
        files.rmtree(os.path.join(root, name))
      except OSError:
        pass
      steps.append(int(found.group(1)))
  return steps


def checkpoint_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      files.absolute(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True))


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step, or None."""
  if not files.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  mngr = ocp.CheckpointManager(files.absolute(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step()
  mngr.close()
  return step


class _QuietLateReads:
  """When a restore fails, tensorstore's reads still in flight finish on their own threads and
  report to orbax's closed event loop: each prints a `RuntimeError: Event loop is closed`
  traceback (through sys.unraisablehook), and asyncio logs the failed reads nobody awaited
  ("Task exception was never retrieved") around our one-line message. Those, and only those,
  are dropped: from the start of a restore, and for good once it failed."""

  def __enter__(self):
    self.previous = sys.unraisablehook
    self.asyncio_log = python_logging.getLogger('asyncio')
    self.asyncio_disabled = self.asyncio_log.disabled

    def hook(unraisable):
      value = unraisable.exc_value
      if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
        self.previous(unraisable)

    sys.unraisablehook = hook
    self.asyncio_log.disabled = True

  def __exit__(self, kind, value, tb):
    if kind is None:
      sys.unraisablehook = self.previous
      self.asyncio_log.disabled = self.asyncio_disabled


def _digests(step_dir: str) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), step_dir)] = hashlib.file_digest(
            f, 'sha256').hexdigest()
  return out


def seal_checkpoints(workdir: str) -> None:
  """Records the checksums of every complete checkpoint that has none, and drops the records of
  checkpoints orbax has deleted. Call when no save is in flight (after wait_until_finished).
  Process 0, local workdirs."""
  root, records = os.path.join(workdir, CHECKPOINT_DIR), os.path.join(workdir, CHECKSUM_DIR)
  if jax.process_index() != 0 or not files.is_local(workdir) or not files.isdir(root):
    return
  steps = {n for n in files.listdir(root) if n.isdigit() and files.isdir(os.path.join(root, n))}
  files.makedirs(records)
  for name in files.listdir(records):
    if name.removesuffix('.json') not in steps:
      files.remove(os.path.join(records, name))
  for step in sorted(steps - {n.removesuffix('.json') for n in files.listdir(records)}):
    files.write_json(os.path.join(records, f'{step}.json'),
                     _digests(files.local(os.path.join(root, step))))


def verify_checkpoint(workdir: str, step: int) -> None:
  """The files of checkpoint `step` against the checksums recorded when it was complete (none
  recorded: a run older than the records, or a cloud workdir; nothing to check). WorkdirError
  naming the first file that differs or is missing."""
  record = os.path.join(workdir, CHECKSUM_DIR, f'{step}.json')
  if not files.is_local(workdir) or not files.exists(record):
    return
  try:
    want = files.read_json(record)
  except (OSError, ValueError):
    want = None  # a damaged record says nothing about the checkpoint; orbax's checks remain
  if not isinstance(want, dict):
    return
  step_dir = files.local(os.path.join(workdir, CHECKPOINT_DIR, str(step)))
  have = _digests(step_dir)
  bad = sorted(n for n in want if have.get(n) != want[n])
  if bad:
    how = 'is missing' if bad[0] not in have else 'differs from the checksum recorded at save'
    raise WorkdirError(
        f'the checkpoint of step {step} in {os.path.join(workdir, CHECKPOINT_DIR)} is damaged: '
        f'{bad[0]} {how}{f" ({len(bad)} files in all)" if len(bad) > 1 else ""}. Move that step '
        'folder away to resume from an older one. Nothing was changed.')


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, workdir: str,
            partial: bool = False) -> Any:
  """Restores `step` onto `abstract_state` (ShapeDtypeStructs carrying shardings); `partial`:
  only the entries `abstract_state` names (e.g. {'params': ...}: no optimizer state is read).
  Its files are checked against their checksums first (verify_checkpoint)."""
  verify_checkpoint(workdir, step)
  try:
    with _QuietLateReads():
      if partial:
        return mngr.restore(step, args=ocp.args.PyTreeRestore(
            item=abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise WorkdirError(
        f'the checkpoint of step {step} in {os.path.join(workdir, CHECKPOINT_DIR)} cannot be '
        f'restored ({type(e).__name__}: {first[:300]}). It is damaged or of another model; '
        'move that step folder away to resume from an older one. Nothing was changed.') from None
