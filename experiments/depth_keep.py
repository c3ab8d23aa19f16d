"""Which blocks should a fixed fraction keep? Every `layers` run of a depth sweep, scored with
each keep rule, whatever schedule it trained under.

    python experiments/depth_keep.py --sweep_dir=runs/depth [--split=validation] \
        [--out=runs/depth/keep.json]

A run of configs/ablations/depth.py trained with one `layer_schedule` (which blocks a drawn
count drops); at a fixed fraction a, the first ceil(a·L) blocks (`prefix`: what a nested run
keeps, an early exit) or evenly spaced ones with the first and the last (`spaced`: what the
`spaced` and `rising` schedules keep). This scores each run under both, on the whole split,
without writing into the runs (their eval_curve.json keeps what their own schedule keeps), and
prints a table: per trained schedule and keep rule, the loss at each fraction, mean ± sample sd
over seeds.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys

from absl import app, flags
import jax
import numpy as np

from rag_jax import cli
from rag_jax import activation
from rag_jax.data import pipeline as data_lib
from rag_jax import evaluate
from rag_jax import runs
from rag_jax import workdir as workdir_lib

FRACTIONS = (0.75, 0.5, 0.25)
# keep rule -> the layer_schedule that keeps those blocks at a fixed fraction (nested structure).
KEEP = {'prefix': 'structure', 'spaced': 'spaced'}


def score(workdir: str, split: str) -> dict:
  """{'schedule': the run's layer_schedule, 'seed', (keep, a): loss} of one `layers` run."""
  config, tokenizer, model, params, _ = runs.load_run(workdir)
  act = config.activation
  tokens = data_lib.load(config, tokenizer, (split,)).splits[split]
  key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], 1)
  out = {'schedule': activation.setting(act, 'layer_schedule'), 'seed': int(config.seed)}
  for keep, schedule in KEEP.items():
    keep_act = act.copy_and_resolve_references()
    keep_act.layer_schedule = schedule
    for a in FRACTIONS:
      step = jax.jit(evaluate.make_eval_step(model, evaluate.plan_fn(keep_act, model.cfg,
                                                                     'fixed', a)))
      out[(keep, a)] = evaluate.mean_loss(step, params, tokens, config, key=key)[0]
  return out


def table(rows: list[dict]) -> str:
  groups = collections.defaultdict(list)
  for r in rows:
    groups[r['schedule']].append(r)
  head = ['trained schedule', 'keep', *(f'a = {a:g}' for a in FRACTIONS)]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for schedule, group in sorted(groups.items()):
    for keep in KEEP:
      cells = []
      for a in FRACTIONS:
        v = np.array([r[(keep, a)] for r in group])
        cells.append(f'{v.mean():.4f}' + (f' ± {v.std(ddof=1):.4f}' if len(v) > 1 else '') +
                     f' ({len(v)})')
      lines.append(f'| {schedule} | {keep} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _define_flags():
  flags.DEFINE_string('sweep_dir', None, 'A depth sweep (configs/ablations/depth.py).',
                      required=True)
  flags.DEFINE_enum('split', 'validation', ['validation', 'test'], 'Split scored.')
  flags.DEFINE_string('out', None, 'JSON to write (default: SWEEP_DIR/keep.json).')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  rows = []
  for config_path in sorted(glob.glob(os.path.join(f.sweep_dir, '*', 'config.json'))):
    workdir = os.path.dirname(config_path)
    config = workdir_lib.load_config(workdir)
    act = config.activation
    if not (activation.is_random(act) and 'layers' in activation.parse_sites(act.sites)
            and act.structure == 'nested'):
      continue
    if not os.path.exists(os.path.join(workdir, workdir_lib.EVAL_CURVE_FILE)):
      continue  # still training
    rows.append({'run': os.path.basename(workdir), **score(workdir, f.split)})
  if not rows:
    sys.exit(f'error: {f.sweep_dir} holds no finished nested `layers` run.')
  out = f.out or os.path.join(f.sweep_dir, 'keep.json')
  with open(out, 'w') as fh:
    json.dump([{k if isinstance(k, str) else f'{k[0]}@{k[1]:g}': v for k, v in r.items()}
               for r in rows], fh, indent=1)
  print(table(rows))
  print(f'wrote {out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags_with_output)
