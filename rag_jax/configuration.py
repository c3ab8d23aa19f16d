"""Config files and their validation: one clear message per problem, before anything compiles.

A config file is Python with `get_config(arg)` returning a ConfigDict (`configs/`); the command
lines load it with ml_collections' `config_flags`, and everything else (sweeps, ablation files
that take another file as their base, benchmarks, tests) with `load_config` here.
"""
from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
from typing import Any

import ml_collections

from rag_jax import activation
from rag_jax.errors import ConfigError
from rag_jax.sharding import MESH_AXES

_POSITIVE_INTS = (
    'model.num_layers', 'model.num_heads', 'model.embed_dim', 'model.mlp_dim',
    'model.block_size', 'batch_size', 'num_steps', 'log_every', 'eval_every', 'eval_batch_size',
    'checkpoint_every', 'keep_checkpoints')
_NON_NEGATIVE_FLOATS = (
    'opt.learning_rate', 'opt.min_learning_rate', 'opt.weight_decay', 'opt.grad_clip')
TOKENIZERS = ('char', 'byte', 'bpe')
# The fields that fix the shapes of the parameters and the tokens; a resumed run's config must
# agree with its checkpoint on them, whatever flag is given.
SHAPE_FIELDS = tuple(f'model.{f}' for f in (
    'num_layers', 'num_heads', 'embed_dim', 'mlp_dim', 'block_size', 'use_bias', 'head_dim',
    'layer_heads', 'layer_mlp_dims')) + (
        'data.dataset', 'data.tokenizer')
# The fields a resumed run may change freely: where and how often it logs, evaluates and saves,
# where the data lives, how the devices are laid out and which attention kernel runs (and
# `init_from`, which only a fresh run reads). Nothing
# else may change on resume without `--allow_config_change` (the model, the activation, the
# optimizer, the data, the seed, the dtype); `num_steps` may grow (workdir.check_resume).
RESUME_FREE_FIELDS = ('log_every', 'eval_every', 'eval_batch_size', 'eval_batches',
                      'data.eval_split', 'checkpoint_every', 'keep_checkpoints', 'data.data_dir',
                      'model.attention', 'mesh', 'init_from', 'init_reorder', 'profile_steps',
                      'wandb')
DTYPES = ('float32', 'bfloat16')  # config.dtype: activations and matmuls (parameters: float32).
ATTENTION = ('auto', 'xla', 'cudnn', 'einsum')  # config.model.attention (see models/attention.py).
# config.model.gelu (optional, 'exact' when absent): 'tanh' is GPT-2's approximation.
GELUS = ('exact', 'tanh')


# Fields added to the configs after runs were saved without them, with the value that gives the
# behaviour those runs had: a saved config.json is completed with them when loaded
# (workdir.load_config), so an older run resumes and loads as before.
ADDED_FIELDS = {'init_from': '', 'init_reorder': False, 'data.vocab_size': 0,
                'model.gelu': 'exact', 'model.head_dim': 0, 'profile_steps': '',
                **{f'activation.{k}': activation.DEFAULTS[k] for k in activation.ADDED},
                'model.layer_heads': (),
                'model.layer_mlp_dims': (),
                'wandb': {'project': '', 'entity': '', 'name': '', 'mode': 'online'}}


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the ADDED_FIELDS it lacks set to their defaults (in place)."""
  for dotted, default in ADDED_FIELDS.items():
    *parents, leaf = dotted.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and leaf not in node:
      node[leaf] = default
  return config


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:smoke' -> ('configs/x.py', 'smoke'); no ':' -> (spec, None)."""
  path, _, arg = spec.partition(':')
  return path, arg or None


def load_module(path: str):
  """The Python module of a file, loaded by path as ml_collections' config_flags loads a config
  file (also used for the scripts under experiments/)."""
  if not os.path.isfile(path):
    what = 'is a directory, not' if os.path.isdir(path) else 'does not exist; give the path of'
    raise ConfigError(f'config file {path} {what} a Python config file (e.g. '
                      'configs/shakespeare_char.py).')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `spec` ('path.py' or 'path.py:ARG').

  A config file refuses a variant it does not know with a ConfigError (`unknown_variant`); the
  message then names the file given here, not the base file that raised it."""
  path, spec_arg = split_spec(spec)
  module = load_module(path)
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {path} defines no get_config(arg) function.')
  try:
    config = module.get_config((arg if arg is not None else spec_arg) or None)
  except UnknownVariant as e:  # the outermost file given names itself (ra_x.py builds on x.py)
    e.path = path
    raise
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'config file {path}: get_config() returned {type(config).__name__}, '
                      'not an ml_collections.ConfigDict.')
  return config


class UnknownVariant(ConfigError):
  """`raise configuration.UnknownVariant(arg, VARIANTS)` in a config file's get_config for an
  ARG it does not know; `load_config` adds the path of the file the user named."""

  def __init__(self, arg, known, path: str | None = None):
    super().__init__(arg, known)
    self.arg, self.known, self.path = arg, tuple(known), path

  def __str__(self):
    names = ', '.join(repr(v) for v in self.known)
    return (f'{self.path + ": " if self.path else ""}unknown variant {self.arg!r}; the variants '
            f'are {names} (e.g. {self.path or "configs/x.py"}:{self.known[-1]}).')


def config_from(here: str, relative_path: str):
  """The get_config(arg) of the config file at `relative_path` from the file `here`: a config
  file takes its base with `get_config = configuration.config_from(__file__, '../x.py')`, or
  calls it and edits the result."""
  path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(here)), relative_path))

  def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return load_config(path, arg)

  return get_config


def as_json(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The config as config.json holds it (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config))


def diff(old: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict | dict,
         ) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old value, new value)} of the fields that differ ('<missing>' where a
  config lacks one), compared as config.json holds them."""
  out = {}

  def walk(a, b, prefix):
    for key in sorted(set(a) | set(b)):
      x, y = a.get(key, '<missing>'), b.get(key, '<missing>')
      if isinstance(x, dict) and isinstance(y, dict):
        walk(x, y, f'{prefix}{key}.')
      elif x != y:
        out[f'{prefix}{key}'] = (x, y)

  walk(as_json(old), as_json(new), '')
  return out


def get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split('.'):
    if part not in value:
      raise ConfigError(f'config has no field `{dotted}`; start from a file under configs/.')
    value = value[part]
  return value


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def profile_steps(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`config.profile_steps` ('FIRST,LAST', '' = none) as (first, last), checked."""
  spec = str(config.get('profile_steps', '') or '').strip()
  if not spec:
    return None
  parts = [p.strip() for p in spec.split(',')]
  try:
    first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
  except ValueError:
    first = last = None
  if first is None or not 1 <= first <= last <= config.num_steps:
    raise ConfigError(
        f'config.profile_steps must be "FIRST,LAST" (steps 1 <= FIRST <= LAST <= num_steps='
        f'{config.num_steps}), e.g. "20,22"; got {spec!r}.')
  return first, last


# Activation fields that mean something on a dense config: whether it is on, and how `evaluate`
# truncates a dense model (its widths and sites).
DENSE_ACTIVATION_FIELDS = ('enabled', 'buckets', 'sites')


def check_activation_overrides(fields, config: ml_collections.ConfigDict) -> None:
  """`activation.F` set (on the command line, or by a sweep) on a config whose activation is off
  would train the dense model without a word: one ConfigError instead. `fields`: the dotted
  names given ('activation.lam', ...)."""
  given = [f for f in fields if f.startswith('activation.')
           and f.split('.', 1)[1] not in DENSE_ACTIVATION_FIELDS]
  if given and not config.activation.enabled:
    raise ConfigError(
        f'--config.{given[0]} has no effect: config.activation.enabled is False (this config '
        'trains the dense model); add --config.activation.enabled=True, or start from a '
        'random-activation config (configs/ra_shakespeare_char.py).')


def _non_finite(config, prefix: str = '') -> str | None:
  """The dotted name of the first float field holding NaN or an infinity, else None."""
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      found = _non_finite(value, name + '.')
      if found:
        return found
    elif isinstance(value, float) and not math.isfinite(value):
      return name
  return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot work."""
  bad = _non_finite(config)
  if bad:  # NaN passes every range check written as a comparison; infinities most of them
    raise ConfigError(f'config.{bad} must be a finite number, got {get(config, bad)!r}.')
  for name in _POSITIVE_INTS:
    value = get(config, name)
    if not _is_int(value) or value <= 0:
      raise ConfigError(f'config.{name} must be a positive integer, got {value!r}.')
  for name in _NON_NEGATIVE_FLOATS:
    value = get(config, name)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
      raise ConfigError(f'config.{name} must be a non-negative number, got {value!r}.')
  for name in ('opt.b1', 'opt.b2'):
    value = get(config, name)
    if not isinstance(value, numbers.Real) or not 0 <= value < 1:
      raise ConfigError(f'config.{name} must be in [0, 1), got {value!r}.')
  warmup = get(config, 'opt.warmup_steps')
  if not _is_int(warmup) or warmup < 0:
    raise ConfigError(f'config.opt.warmup_steps must be a non-negative integer, got {warmup!r}.')
  if warmup >= config.num_steps:
    raise ConfigError(
        f'config.opt.warmup_steps ({warmup}) must be smaller than config.num_steps '
        f'({config.num_steps}).')
  _validate_model(config)
  _validate_data(config)
  eval_batches = get(config, 'eval_batches')
  if not _is_int(eval_batches) or (eval_batches <= 0 and eval_batches != -1):
    raise ConfigError(
        f'config.eval_batches must be a positive integer or -1, got {eval_batches!r}.')
  if get(config, 'activation').enabled:
    activation.validate(config.activation, config.model)
    warm = activation.setting(config.activation, 'full_warmup_steps')
    if warm >= config.num_steps:
      raise ConfigError(f'config.activation.full_warmup_steps ({warm}) must be smaller than '
                        f'config.num_steps ({config.num_steps}): the run would never draw.')
  if config.get('init_reorder') and not config.get('init_from'):
    raise ConfigError('config.init_reorder reorders the model config.init_from names; set '
                      'config.init_from (a workdir, an export or a converted GPT-2).')
  _validate_mesh(get(config, 'mesh'))
  profile_steps(config)
  wandb = config.get('wandb') or {}
  if wandb.get('mode', 'online') not in ('online', 'offline', 'disabled'):
    raise ConfigError("config.wandb.mode must be 'online', 'offline' or 'disabled', got "
                      f"{wandb.get('mode')!r}.")
  dtype = config.get('dtype', 'float32')
  if dtype not in DTYPES:
    raise ConfigError(f'config.dtype must be one of {DTYPES}, got {dtype!r}.')


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """The model fields of `validate`."""
  m = config.model
  head_dim = m.get('head_dim', 0)
  if not _is_int(head_dim) or head_dim < 0:
    raise ConfigError(f'config.model.head_dim must be a positive integer (or 0: embed_dim / '
                      f'num_heads), got {head_dim!r}.')
  if not head_dim and m.embed_dim % m.num_heads:
    raise ConfigError(
        f'config.model.num_heads ({m.num_heads}) must divide config.model.embed_dim '
        f'({m.embed_dim}); pick a head count that divides the width.')
  for name in ('layer_heads', 'layer_mlp_dims'):
    value = m.get(name, ()) or ()
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v > 0 for v in value):
      raise ConfigError(f'config.model.{name} must be a list of positive integers (one per '
                        f'block) or empty, got {value!r}.')
    if value and len(value) != m.num_layers:
      raise ConfigError(f'config.model.{name} has {len(value)} entries for '
                        f'config.model.num_layers={m.num_layers} blocks.')
    if value and get(config, 'activation').enabled:
      raise ConfigError(f'config.model.{name}: blocks of their own widths (a per-layer export) '
                        'train and run dense only; the random activation takes one width per '
                        'site. Set config.activation.enabled=False.')
  if not isinstance(m.dropout, numbers.Real) or not 0 <= m.dropout < 1:
    raise ConfigError(f'config.model.dropout must be in [0, 1), got {m.dropout!r}.')
  attention = m.get('attention', 'auto')
  if attention not in ATTENTION:
    raise ConfigError(f'config.model.attention must be one of {ATTENTION}, got {attention!r}.')
  gelu = m.get('gelu', 'exact')
  if gelu not in GELUS:
    raise ConfigError(f'config.model.gelu must be one of {GELUS}, got {gelu!r}.')


def _validate_data(config: ml_collections.ConfigDict) -> None:
  """The data fields of `validate`."""
  d = config.data
  if d.tokenizer not in TOKENIZERS:
    raise ConfigError(f'config.data.tokenizer must be one of {TOKENIZERS}, got {d.tokenizer!r}.')
  if d.tokenizer == 'bpe' and not config.get('init_from') and d.dataset != 'tokens':
    size = d.get('vocab_size', 0)
    if not _is_int(size) or size < 258:
      raise ConfigError(f"config.data.tokenizer='bpe' trains a byte-level BPE on the train split: "
                        'config.data.vocab_size must be an integer above 257 (the 256 bytes and '
                        f'<|endoftext|>), got {size!r}.')
  if d.dataset == 'tokens' and not d.paths:
    raise ConfigError(
        "config.data.dataset='tokens' needs config.data.paths: the directory of a corpus "
        'prepared as token arrays (e.g. `python -m rag_jax.data.sotu --out=DIR`).')
  if d.dataset == 'text_files' and not d.paths:
    raise ConfigError(
        "config.data.dataset='text_files' needs config.data.paths (comma-separated files or "
        'globs of plain text).')
  if d.eval_split not in ('train', 'validation', 'test'):
    raise ConfigError(
        f"config.data.eval_split must be 'train', 'validation' or 'test', got {d.eval_split!r}.")


def _validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  sizes = []
  for axis in MESH_AXES:
    n = mesh.get(axis, 1)
    if not _is_int(n) or (n <= 0 and n != -1):
      raise ConfigError(f'config.mesh.{axis} must be a positive integer or -1, got {n!r}.')
    sizes.append(n)
  if sizes.count(-1) > 1:
    raise ConfigError('config.mesh: at most one of data, fsdp, tensor may be -1 (the rest).')
  cpu = mesh.get('cpu_devices', 0)
  if not _is_int(cpu) or cpu < 0:
    raise ConfigError(f'config.mesh.cpu_devices must be 0 (one per core) or a positive integer, '
                      f'got {cpu!r}.')
  for name, target in (mesh.get('rules') or {}).items():
    unknown = [a for a in str(target or '').split(',') if a and a not in MESH_AXES]
    if unknown:
      raise ConfigError(f'config.mesh.rules.{name}={target!r}: {unknown} not a mesh axis; use a '
                        f"comma-separated subset of {MESH_AXES}, or '' to keep {name} whole.")
