"""What the command lines share: flags defined once, and one line instead of a traceback.

`train`, `evaluate` and `sample` are thin: absl flags, one call into the package, and the
package's errors (errors.ConfigError, WorkdirError, DataError; all ValueErrors) printed as
`error: ...` with exit status 1.
"""
from __future__ import annotations

import re
import sys

from absl import flags

ACTIVATION_FLAGS = ('alpha', 'beta', 'lam', 'structure', 'sites')


def define_activation_flags(structure: bool = False) -> None:
  """--alpha, --beta, --lam (and with `structure`, --structure and --sites): overrides of the
  run's config.activation for the `random` policy and for what-if evaluations."""
  flags.DEFINE_float('alpha', None, 'Override the run\'s activation alpha.')
  flags.DEFINE_float('beta', None, 'Override the run\'s activation beta.')
  flags.DEFINE_float('lam', None, 'Override the run\'s activation lam.')
  if structure:
    flags.DEFINE_string('structure', None, 'Override: nested, random or bernoulli.')
    flags.DEFINE_string('sites', None, 'Override: comma-separated mlp,heads,layers.')


def activation_overrides() -> dict:
  """The activation flags this command defines and that were given, as {field: value}."""
  f = flags.FLAGS
  return {k: f[k].value for k in ACTIVATION_FLAGS if k in f and f[k].value is not None}


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for the CLIs: a bad `--config.FIELD=VALUE` gives one line, no traceback."""
  try:
    return flags.FLAGS(argv)
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
