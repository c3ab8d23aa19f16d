"""Sweeps: the runs of an ablation file, their names, and their overrides checked up front.

An ablation file (configs/ablations/*.py) holds `get_config(arg)`, the base config of every run,
and `sweep(arg)`, which yields override dicts with dotted keys (big_vision style):

    def sweep(arg=None):
      yield {'activation.enabled': False}        # the dense baseline
      for lam in (0.25, 0.5, 0.75):
        yield {'activation.lam': lam}

A run is named by its overrides, sorted by key (`lam=0.25`; `alpha=0.5,beta=1,lam=0.25`), and
trained through the command line as

    python -m rag_jax.train --config=FILE:ARG --workdir=SWEEP_DIR/NAME --config.activation.lam=0.25

`expand` applies every override to the base config and validates the result before anything
runs: an unknown field, a value of the wrong type or one that cannot work (configuration.validate)
stops the whole sweep with one message naming the run and the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Iterable

import ml_collections

from rag_jax import activation
from rag_jax import configuration
from rag_jax.errors import ConfigError

DENSE = {'activation.enabled': False}  # the baseline every ablation includes
_MAX_NAME = 120
_UNSAFE = re.compile(r'[^A-Za-z0-9._+=-]')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict  # the base config with the overrides applied

  def flags(self) -> list[str]:
    """The overrides as rag_jax.train flags: --config.FIELD=VALUE."""
    return [f'--config.{k}={flag_value(v)}' for k, v in sorted(self.overrides.items())]

  @property
  def random_activation(self) -> bool:
    return activation.is_random(self.config.activation)


def flag_value(value) -> str:
  """A value as config_flags parses it back to the same value (floats round-trip by repr)."""
  return repr(value) if isinstance(value, float) else str(value)


def _name_value(value) -> str:
  if isinstance(value, str) and '/' in value and len(value) > 40:
    # A long path (init_from naming a run's workdir) as a short digest.
    return 'path-' + hashlib.sha1(value.encode()).hexdigest()[:8]
  text = flag_value(value)
  if isinstance(value, float) and text.endswith('.0'):
    text = text[:-2]
  return _UNSAFE.sub('-', text.replace(',', '+'))


def full_run_name(overrides: dict[str, Any]) -> str:
  """`run_name` before it is shortened: every `key=value` pair, however long."""
  if not overrides:
    return 'base'
  keys = sorted(overrides)
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return ','.join(f'{short if last.count(short) == 1 else key}={_name_value(overrides[key])}'
                  for key, short in zip(keys, last))


def run_name(overrides: dict[str, Any]) -> str:
  """Stable, filesystem-safe name of a run: `key=value` pairs sorted by dotted key, joined by
  commas; a key is its last component unless two keys of the run share it. Lists in string
  values ('mlp,heads') are written with '+', paths over 40 characters as `path-` and a digest.
  Floats and ints of equal value name alike. A name over _MAX_NAME characters keeps its start
  and ends in `~` and a digest of the whole (`full_run_name`)."""
  name = full_run_name(overrides)
  if len(name) > _MAX_NAME:  # keep it readable and under filesystem limits; still unique.
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:_MAX_NAME - 11]}~{digest}'
  return name


def _type_error(key: str, old, new) -> str | None:
  """Why `new` cannot replace `old` (as config_flags would parse it), or None."""
  if isinstance(old, bool) or isinstance(new, bool):
    ok = isinstance(old, bool) and isinstance(new, bool)
  elif isinstance(old, float):
    ok = isinstance(new, (int, float))
  else:
    ok = type(new) is type(old)  # pylint: disable=unidiomatic-typecheck
  if ok:
    return None
  return (f'`{key}` is a {type(old).__name__} field (now {old!r}); the override gives '
          f'{type(new).__name__} {new!r}.')


def apply(config: ml_collections.ConfigDict,
          overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted overrides set; ConfigError for an unknown field or a
  value of another type (an int may set a float field, as on the command line)."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    parent_key, _, leaf = key.rpartition('.')
    parent = configuration.get(config, parent_key) if parent_key else config
    if not isinstance(parent, ml_collections.ConfigDict) or leaf not in parent:
      raise ConfigError(f'the config has no field `{key}`.')
    old = parent[leaf]
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(
          f'`{key}` is a group of fields; override its fields one by one ({key}.FIELD).')
    problem = _type_error(key, old, value)
    if problem:
      raise ConfigError(problem)
    parent[leaf] = float(value) if isinstance(old, float) else value
  return config


def make_runs(base: ml_collections.ConfigDict, sweep: Iterable[dict[str, Any]]) -> list[Run]:
  """Named, validated runs; ConfigError naming the first run that cannot work."""
  runs, seen = [], {}
  for i, overrides in enumerate(sweep):
    where = f'sweep entry {i} {overrides!r}'
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
      raise ConfigError(f'{where}: sweep() must yield dicts with dotted keys.')
    name = run_name(overrides)
    if name in seen:
      raise ConfigError(
          f'{where} has the same name {name!r} as entry {seen[name]}; every run must differ.')
    seen[name] = i
    try:
      config = apply(base, overrides)
      configuration.validate(config)
    except ConfigError as e:
      raise ConfigError(f'{where}: {e}') from None
    runs.append(Run(name=name, overrides=dict(overrides), config=config))
  if not runs:
    raise ConfigError('the sweep yields no runs.')
  return runs


def expand(spec: str) -> list[Run]:
  """The runs of the ablation file `spec` ('configs/ablations/x.py[:ARG]'), validated."""
  path, arg = configuration.split_spec(spec)
  module = configuration.load_module(path)
  if not hasattr(module, 'sweep'):
    raise ConfigError(f'{path} has no sweep(arg) function; it is not a sweep file.')
  base = module.get_config(arg)
  return make_runs(base, module.sweep(arg))
