"""What a run leaves in its workdir, and reading it back safely.

    DIR/config.json      the full config of the run
    DIR/tokenizer.json   the tokenizer built from the train split
    DIR/metrics.jsonl    one JSON object per logged step
    DIR/eval_curve.json  written by rag_jax.evaluate
    DIR/checkpoints/     orbax CheckpointManager steps
    DIR/events.*         TensorBoard
"""
from __future__ import annotations

import json
import os
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
CHECKPOINT_DIR = 'checkpoints'


def quiet_logs() -> None:
  """Keeps absl INFO lines (orbax logs every save) off the terminal of the CLIs."""
  logging.set_verbosity(logging.WARNING)


def root_keys(seed: int) -> dict[str, jax.Array]:
  """The root key of a run, split once by purpose (docs/design.md §5)."""
  init, train, sample = jax.random.split(jax.random.key(seed), 3)
  return {'init': init, 'train': train, 'sample': sample}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  files.write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise WorkdirError(f'{path} does not exist; is {workdir} a workdir written by rag_jax.train?') from None
  except json.JSONDecodeError as e:
    raise WorkdirError(f'{path} is damaged ({e}).') from None


def check_same_model(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     workdir: str) -> None:
  """A workdir's checkpoints can only be resumed by a config of the same model and data."""
  fields = [f'model.{f}' for f in configuration.MODEL_FIELDS] + ['data.dataset', 'data.tokenizer']
  diffs = []
  for name in fields:
    try:
      old = configuration.get(saved, name)
    except ConfigError:
      old = '<missing>'
    new = configuration.get(config, name)
    if old != new:
      diffs.append(f'{name}: {old!r} in the workdir, {new!r} now')
  if diffs:
    raise WorkdirError(
        f'{workdir} holds a checkpoint of a different model ({"; ".join(diffs)}). '
        'Use a new --workdir, or move its checkpoints/ away to start over.')


def checkpoint_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True))


def latest_step(workdir: str) -> int | None:
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step()
  mngr.close()
  return step


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, workdir: str,
            partial: bool = False) -> Any:
  """Restores `step` onto `abstract_state` (ShapeDtypeStructs carrying shardings); `partial`:
  only the entries `abstract_state` names (e.g. {'params': ...}: no optimizer state is read)."""
  try:
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
