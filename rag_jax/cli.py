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

from rag_jax import configuration
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


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in `argv` (the last one given), or None."""
  spec = None
  for i, a in enumerate(argv[1:], 1):
    if a.startswith('--config='):
      spec = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def config_overrides(argv: list[str]) -> list[str]:
  """The dotted fields `--config.FIELD=VALUE` sets in `argv` ('activation.lam', ...): what
  configuration.check_activation_overrides checks (train.check_config)."""
  return [a.split('=')[0][len('--config.'):] for a in argv[1:] if a.startswith('--config.')]


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for the CLIs: a missing config file, an unknown variant or a bad
  `--config.FIELD=VALUE` gives one line, no traceback."""
  spec = _config_spec(argv)
  if spec is not None:  # config_flags would defer a missing file or bury the message.
    try:
      configuration.load_config(spec)
    except ConfigError as e:
      sys.exit(f'error: --config: {e}')
  try:
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
