"""Loss against steps, and against compute, for one or several runs, as a picture.

    python -m rag_jax.plot --workdirs=runs/dense,runs/ra [--out=loss.png] [--log_x]

Reads each workdir's metrics.jsonl (local or gs://, through epath): the training loss as a line,
the evaluation loss as dots of the same colour; the label is the workdir's name. Where a run has
been scored by `evaluate` (eval_curve.json), a second panel draws its validation loss against
FLOPs per token: each fixed width a point on a line, the random and adaptive policies as
separate markers. Writes a PNG (default: loss.png in the current directory).
"""
from __future__ import annotations

import io
import json
import os
import sys

from absl import app, flags
from matplotlib import figure

from rag_jax import cli
from rag_jax import files
from rag_jax import workdir as workdir_lib
from rag_jax.errors import WorkdirError



def read_metrics(workdir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl, or one WorkdirError naming what is missing."""
  path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if not files.exists(path):
    raise WorkdirError(f'{path} does not exist; give the --workdirs of runs written by '
                       'rag_jax.train.')
  rows = []
  for i, line in enumerate(files.read_text(path).splitlines()):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise WorkdirError(f'{path} line {i + 1} is damaged ({e}).') from None
  return rows


def read_curve(workdir: str, split: str = 'validation') -> dict[str, list[tuple]]:
  """A run's scored entries of `split` as {policy: [(FLOPs per token, loss), ...]} (sorted by
  FLOPs); {} when the run has not been evaluated."""
  path = os.path.join(workdir, workdir_lib.EVAL_CURVE_FILE)
  if not files.exists(path):
    return {}
  try:
    entries = files.read_json(path)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{path} is damaged ({e}).') from None
  out = {}
  for e in entries:
    if e.get('split', 'validation') == split:
      out.setdefault(e['policy'], []).append((e['flops_per_token'], e['loss']))
  return {policy: sorted(points) for policy, points in out.items()}


def plot(workdirs: list[str], out: str, log_x: bool = False) -> str:
  """Draws the runs' losses into `out` (PNG); returns `out`."""
  runs = {w: read_metrics(w) for w in workdirs}  # every input checked before drawing
  curves = {w: read_curve(w) for w in workdirs}
  scored = any(curves.values())
  # No pyplot: a notebook's backend is left alone.
  fig = figure.Figure(figsize=(13, 4.5) if scored else (7, 4.5))
  ax, *rest = fig.subplots(1, 2 if scored else 1, squeeze=False)[0]
  for i, (workdir, rows) in enumerate(runs.items()):
    color = f'C{i % 10}'
    name = os.path.basename(os.path.normpath(str(files.path(workdir)))) or workdir
    train = [(r['step'], r['train_loss']) for r in rows if 'train_loss' in r]
    evals = [(r['step'], r['eval_loss']) for r in rows if 'eval_loss' in r]
    if train:
      ax.plot(*zip(*train), color=color, lw=1, alpha=0.8, label=f'{name} train')
    if evals:
      ax.plot(*zip(*evals), 'o-', color=color, ms=4, lw=1.5, label=f'{name} eval')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats per token)')
  ax.set_title('loss against steps', fontsize=10)
  if log_x:
    ax.set_xscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if scored:
    _draw_compute(rest[0], curves)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  files.write_bytes(out, buffer.getvalue())
  return out


def _draw_compute(ax, curves: dict[str, dict[str, list[tuple]]]) -> None:
  """Validation loss against FLOPs per token: fixed widths joined, other policies as markers."""
  markers = {'random': 'D', 'adaptive': '^'}
  for i, (workdir, curve) in enumerate(curves.items()):
    name = os.path.basename(os.path.normpath(str(files.path(workdir)))) or workdir
    for policy, points in curve.items():
      style = 'o-' if policy == 'fixed' else markers.get(policy, 's')
      ax.plot(*zip(*points), style, color=f'C{i % 10}', ms=5, lw=1.5,
              label=f'{name} {policy}')
  ax.set_xlabel('forward FLOPs per token')
  ax.set_ylabel('validation loss (nats per token)')
  ax.set_title('loss against compute (evaluate)', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _define_flags():
  flags.DEFINE_list('workdirs', None, 'Comma-separated run workdirs.', required=True)
  flags.DEFINE_string('out', 'loss.png', 'PNG to write (local or a cloud path).')
  flags.DEFINE_bool('log_x', False, 'Steps on a logarithmic axis.')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  try:
    if not f.workdirs:
      raise WorkdirError('--workdirs names no run; give one or more workdirs, comma-separated.')
    workdir_lib.check_output_file(f.out)
    print(f'wrote {plot(f.workdirs, f.out, f.log_x)}')
  except WorkdirError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
