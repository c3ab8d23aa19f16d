"""Where a training run's numbers go: metrics.jsonl, TensorBoard, and optionally Weights & Biases;
and the profiler trace of `config.profile_steps`.

Written by process 0 only, through `epath`, so a workdir may be a local directory or a cloud
path (gs://...). TensorBoard events are written with tensorboardX (light, no TensorFlow import);
for a URI workdir its records go through `EpathRecordWriter`. clu's metric writers (clu 0.0.12
installs beside jax 0.10) were measured and not used: importing any of them imports TensorFlow
and tensorboard, several seconds at every process start (README, "Seeing a run").
"""
from __future__ import annotations

import io
import json
import math
import os
import secrets
from typing import Any

from etils import epath
from etils.epath import gpath
import jax
import ml_collections
import tensorboardX
from tensorboardX import record_writer
from tensorboardX import summary as tb_summary

from rag_jax import configuration
from rag_jax import files
from rag_jax import workdir as workdir_lib
from rag_jax.errors import ConfigError

WANDB_ID_FILE = 'wandb_run_id.txt'
# Scalars TensorBoard's HParams dashboard lists beside each run's hyperparameters.
HPARAM_METRICS = ('train_loss', 'eval_loss')


class EpathRecordWriter:
  """tensorboardX's record writer for URI paths (gs://, s3://...): keeps the event file's bytes
  and writes the whole object through epath at each flush (object stores cannot append; an
  object appears whole). Scalar event files stay small."""

  def __init__(self, path: str):
    self.path, self.buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathFactory:

  def open(self, path):
    return EpathRecordWriter(path)

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_uri_writers() -> None:
  """Every URI scheme epath knows (gs, s3, az, hf) goes through EpathRecordWriter."""
  for prefix in gpath._URI_PREFIXES:  # pylint: disable=protected-access
    record_writer.register_writer_factory(prefix.split(':')[0], _EpathFactory())


_register_uri_writers()


def flat_hparams(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The config as dotted keys with scalar values (what TensorBoard and W&B take)."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(name + '.', value)
      elif isinstance(value, (bool, int, float, str)):
        out[name] = value
      else:
        out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

  walk('', config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  return out


class JsonlLog:
  """metrics.jsonl: one JSON line per logged step. Local files are appended to; a cloud file is
  rewritten whole at each write (no appends in object stores)."""

  def __init__(self, workdir: epath.Path, resume_step: int):
    self.path = workdir / workdir_lib.METRICS_FILE
    self.local = files.is_local(self.path)
    self.lines = []
    if self.path.exists():  # drop lines logged after the checkpoint we resume from.
      self.lines = [l + '\n' for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l)['step'] <= resume_step]
      files.write_text(self.path, ''.join(self.lines))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    line = json.dumps({'step': step, **metrics}) + '\n'
    if self.local:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self.lines.append(line)
      files.write_text(self.path, ''.join(self.lines))


class WandbLog:
  """Weights & Biases (`config.wandb.project` set): one W&B run per workdir, resumed with the
  workdir (its id is kept in the workdir), files under the workdir, `config.wandb.mode`
  'online' | 'offline' (sync later with `wandb sync`)."""

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("config.wandb.project is set but wandb is not installed: "
                        "pip install -e '.[wandb]' (or clear config.wandb.project).") from None
    w = config.wandb
    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    files.write_text(id_file, run_id)
    # W&B writes its own files to a local directory: the workdir when local.
    local_dir = str(workdir) if files.is_local(workdir) else None
    self.run = wandb.init(project=w.project, entity=w.get('entity') or None,
                          name=w.get('name') or workdir.name, id=run_id, resume='allow',
                          dir=local_dir, mode=w.get('mode', 'online'),
                          config=flat_hparams(config))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    self.run.log(metrics, step=step)

  def close(self) -> None:
    self.run.finish()


class MetricsLog:
  """metrics.jsonl, TensorBoard (scalars, the config as hyperparameters and as text) and, when
  configured, W&B; written by process 0 only."""

  def __init__(self, workdir, resume_step: int, config: ml_collections.ConfigDict):
    self.enabled = jax.process_index() == 0
    self.tb = self.wandb = self.jsonl = None
    if not self.enabled:
      return
    workdir = files.path(workdir)
    self.jsonl = JsonlLog(workdir, resume_step)
    self.tb = tensorboardX.SummaryWriter(str(workdir))
    hparams = flat_hparams(config)
    for s in tb_summary.hparams(hparams, {m: math.nan for m in HPARAM_METRICS}):
      self.tb.file_writer.add_summary(s)
    self.tb.add_text('config', '```\n' + json.dumps(config.to_dict(), indent=2) + '\n```', 0)
    self.tb.flush()
    if config.get('wandb') and config.wandb.get('project'):
      self.wandb = WandbLog(workdir, config)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(step, metrics)
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.write(step, metrics)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.close()


class Profiler:
  """A jax.profiler trace of steps FIRST..LAST into <workdir>/plugins/profile/<time>/, which
  TensorBoard's profile tab shows (`make tensorboard` installs the plugin). The trace starts
  before step FIRST is dispatched and stops once step LAST's results are ready."""

  def __init__(self, config: ml_collections.ConfigDict, workdir):
    self.steps = configuration.profile_steps(config)
    self.workdir = os.fspath(files.path(workdir))
    self.active = False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0] and jax.process_index() == 0:
      jax.profiler.start_trace(self.workdir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step == self.steps[1]:
      jax.block_until_ready(outputs)
      self.stop()
      workdir_lib.notice(f'profile of steps {self.steps[0]}-{self.steps[1]} written to '
                         f"{os.path.join(self.workdir, 'plugins', 'profile')} (make tensorboard)")

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
