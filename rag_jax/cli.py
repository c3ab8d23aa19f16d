"""What the command lines share: flags defined once, and one line instead of a traceback.

`train`, `evaluate` and `sample` are thin: absl flags, one call into the package, and the
package's errors (errors.ConfigError, WorkdirError, DataError; all ValueErrors) printed as
`error: ...` with exit status 1.
"""
from __future__ import annotations

import math
import re
import sys

from absl import flags
from ml_collections import config_flags

from rag_jax import configuration
from rag_jax import workdir as workdir_lib
from rag_jax.errors import ConfigError

ACTIVATION_FLAGS = ('alpha', 'beta', 'lam', 'structure', 'sites', 'layer_schedule')
# What a command line prints as `error: ...` (exit status 1) instead of a traceback: the package's
# errors (ValueErrors), a diverged run, and a file the operating system refused (the message
# names the path).
ERRORS = (ValueError, FloatingPointError, OSError)


def define_activation_flags(structure: bool = False) -> None:
  """--alpha, --beta, --lam (and with `structure`, --structure, --sites, --layer_schedule):
  overrides of the run's config.activation for the `random` policy and for what-if evaluations."""
  flags.DEFINE_float('alpha', None, 'Override the run\'s activation alpha.')
  flags.DEFINE_float('beta', None, 'Override the run\'s activation beta.')
  flags.DEFINE_float('lam', None, 'Override the run\'s activation lam.')
  if structure:
    flags.DEFINE_string('structure', None, 'Override: nested, random or bernoulli.')
    flags.DEFINE_string('sites', None, 'Override: comma-separated mlp,heads,layers.')
    flags.DEFINE_string('layer_schedule', None,
                        'Override: structure, spaced or rising (the blocks `layers` keeps).')


def activation_overrides() -> dict:
  """The activation flags this command defines and that were given, as {field: value}."""
  f = flags.FLAGS
  return {k: f[k].value for k in ACTIVATION_FLAGS if k in f and f[k].value is not None}


def config_overrides(argv: list[str]) -> list[str]:
  """The dotted fields `--config.FIELD=VALUE` sets in `argv` ('activation.lam', ...): what
  configuration.check_activation_overrides checks (train.check_config)."""
  return [a.split('=')[0][len('--config.'):] for a in argv[1:] if a.startswith('--config.')]


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --NAME in `argv` (the last one given), or None."""
  value = None
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f'--{name}='):
      value = a.split('=', 1)[1]
    elif a == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _define_run_config(argv: list[str]) -> None:
  """For a tool that reads a workdir (evaluate, sample, export, search, serve): `--config.FIELD=
  VALUE` overrides the run's saved config, parsed by ml_collections as `train` parses them
  (the saved config is the flag's default, so types and unknown fields are checked alike)."""
  if 'config' in flags.FLAGS or 'workdir' not in flags.FLAGS or not config_overrides(argv):
    return
  workdir = _flag_value(argv, 'workdir')
  if not workdir:
    sys.exit('error: --config.* overrides the saved config of the run --workdir names; '
             'give --workdir.')
  try:
    saved = workdir_lib.load_config(workdir)
  except ValueError as e:
    sys.exit(f'error: {e}')
  config_flags.DEFINE_config_dict('config', saved, 'The run\'s saved config (overrides only).',
                                  lock_config=True)


def run_overrides() -> dict:
  """{dotted field: value} of the `--config.FIELD=VALUE` given to a tool that reads a workdir
  (runs.load_run applies them); {} when none were."""
  if 'config' not in flags.FLAGS:
    return {}
  return config_flags.get_override_values(flags.FLAGS['config'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for the CLIs: a missing config file, an unknown variant or a bad
  `--config.FIELD=VALUE` gives one line, no traceback."""
  spec = _flag_value(argv, 'config')
  if spec is not None:  # config_flags would defer a missing file or bury the message.
    try:
      configuration.load_config(spec)
    except ConfigError as e:
      sys.exit(f'error: --config: {e}')
  try:
    _define_run_config(argv)  # (ml_collections parses the overrides here already)
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field.
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    text = str(e.args[0] if e.args else e)
    found = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    missing = found.group(0) if found else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    culprits = [a.split('=')[0] for a in argv[1:]
                if a.startswith('--config.') and missing in a.split('=')[0].split('.')]
    where = culprits[0] if culprits else 'a --config.* override'
    sys.exit(f'error: {where}: the config has no field {missing!r}'
             + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
             + '; the fields are those set in the config file (unknown fields are errors).')
  problem = non_finite_flag(flags.FLAGS)
  if problem:
    sys.exit(f'error: {problem}')
  return rest


def parse_flags_with_output(argv: list[str]) -> list[str]:
  """`parse_flags`, then the file `--out` names checked (its directory made, writable, not a
  directory) before any work: the benchmark and experiment scripts' flags parser, so that no
  measurement is taken and then lost."""
  rest = parse_flags(argv)
  out = flags.FLAGS['out'].value if 'out' in flags.FLAGS else None
  if out:
    try:
      workdir_lib.check_output_file(out)
    except ValueError as e:
      sys.exit(f'error: {e}')
  return rest


def non_finite_flag(flag_values) -> str | None:
  """The first float flag, or list flag of numbers, given NaN or an infinity (which pass every
  range check written as a comparison), as a message; else None."""
  for name in flag_values:
    flag = flag_values[name]
    value = flag.value
    if isinstance(flag.parser, flags.FloatParser) and value is not None:
      values = [value]
    elif isinstance(value, list) and value:
      try:
        values = [float(v) for v in value]
      except (TypeError, ValueError):
        continue  # not a list of numbers
    else:
      continue
    if not all(math.isfinite(v) for v in values):
      shown = ','.join(map(str, value)) if isinstance(value, list) else value
      return f'--{name}={shown}: must be a finite number.'
  return None
