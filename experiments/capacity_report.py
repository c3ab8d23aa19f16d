"""Is the capacity recipe capacity-limited? The dense runs' table and loss curves.

    python experiments/capacity_report.py --sweep_dirs=runs/capacity,runs/capacity_scan \
        --out_dir=results/capacity

Reads every dense run (config.json, metrics.jsonl) in the sweep dirs of
configs/ablations/capacity.py (`:main` and `:scan`) and writes to OUT_DIR:

  scan.md    one row per (shape, width, steps, seed): tokens seen, parameters (all, and in the
             blocks), tokens per parameter, the final validation loss, its gap to the full-width
             model of the same shape, steps and seed, and its gain over the same model at half
             the steps; then the two checks the recipe must pass (narrower is measurably worse;
             doubling the steps buys little);
  scan.json  the same rows;
  scan.png   validation loss against tokens seen for the recipe's shape: one line per width and
             step count (the curves flattening, or not).

A run that has not finished is listed with the last loss it logged and marked unfinished.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys

from absl import app, flags
import jax
import matplotlib
from matplotlib import figure
import ml_collections

from rag_jax import configuration
from rag_jax import runs


def _read_metrics(workdir: str) -> list[dict]:
  rows = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # a line cut by a stopped run
  return rows


def param_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(all parameters, parameters of the blocks) of the run's model."""
  model = runs.make_model(config, config.data.vocab_size)
  shapes = jax.eval_shape(lambda key: runs.init_params(model, key), jax.random.key(0))
  flat = jax.tree_util.tree_leaves_with_path(shapes)
  total = sum(math.prod(x.shape) for _, x in flat)
  blocks = sum(math.prod(x.shape) for path, x in flat
               if any('block' in str(getattr(k, 'key', '')) for k in path))
  return int(total), int(blocks)


def dense_rows(sweep_dirs: list[str]) -> list[dict]:
  rows = []
  for sweep_dir in sweep_dirs:
    for path in sorted(glob.glob(os.path.join(sweep_dir, '*', 'config.json'))):
      workdir = os.path.dirname(path)
      config = configuration.complete(ml_collections.ConfigDict(json.load(open(path))))
      if config.activation.enabled and config.activation.lam > 0:
        continue
      if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
        continue
      curve = [(m['step'], m['eval_loss']) for m in _read_metrics(workdir) if 'eval_loss' in m]
      if not curve:
        continue
      total, blocks = param_counts(config)
      tokens = config.batch_size * config.model.block_size
      m = config.model
      rows.append({
          'run': os.path.basename(workdir), 'embed_dim': m.embed_dim, 'heads': m.num_heads,
          'mlp_dim': m.mlp_dim, 'steps': config.num_steps, 'seed': config.seed,
          'finished': curve[-1][0] == config.num_steps, 'last_step': curve[-1][0],
          'loss': curve[-1][1], 'tokens': config.num_steps * tokens, 'params': total,
          'block_params': blocks, 'curve': [(s * tokens, loss) for s, loss in curve]})
  return rows


def _full_heads(rows: list[dict]) -> dict[int, int]:
  return {d: max(r['heads'] for r in rows if r['embed_dim'] == d)
          for d in {r['embed_dim'] for r in rows}}


def annotate(rows: list[dict]) -> list[dict]:
  """Adds width `a`, tokens per parameter, `gap` (relative to the full width of the same shape,
  steps and seed) and `gain_from_half` (relative loss drop from half the steps)."""
  full = _full_heads(rows)
  index = {(r['embed_dim'], r['heads'], r['steps'], r['seed']): r for r in rows}
  for r in rows:
    r['a'] = r['heads'] / full[r['embed_dim']]
    r['tokens_per_param'] = r['tokens'] / r['params']
    r['tokens_per_block_param'] = r['tokens'] / r['block_params']
    ref = index.get((r['embed_dim'], full[r['embed_dim']], r['steps'], r['seed']))
    r['gap'] = r['loss'] / ref['loss'] - 1 if ref and ref['finished'] and r['finished'] else None
    half = index.get((r['embed_dim'], r['heads'], r['steps'] // 2, r['seed']))
    r['gain_from_half'] = (1 - r['loss'] / half['loss']
                           if half and half['finished'] and r['finished'] else None)
  return sorted(rows, key=lambda r: (r['embed_dim'], -r['a'], r['steps'], r['seed']))


def _pct(x) -> str:
  return '' if x is None else f'{100 * x:+.2f}%'


def markdown(rows: list[dict]) -> str:
  lines = ['| D | a | steps | seed | tokens | params (blocks) | tokens/param | val loss | '
           'gap to a = 1 | gain from half the steps |', '|' + '---|' * 10]
  for r in rows:
    loss = f"{r['loss']:.4f}" + ('' if r['finished'] else f" (unfinished, step {r['last_step']})")
    lines.append(
        f"| {r['embed_dim']} | {r['a']:g} | {r['steps']} | {r['seed']} | "
        f"{r['tokens'] / 1e6:.1f}M | "
        f"{r['params'] / 1e3:.0f}k ({r['block_params'] / 1e3:.0f}k) | "
        f"{r['tokens_per_param']:.0f} | {loss} | {_pct(r['gap'])} | {_pct(r['gain_from_half'])} |")
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], embed_dim: int) -> figure.Figure:
  fig = figure.Figure(figsize=(8, 5), layout='constrained')
  ax = fig.add_subplot()
  colors = {1.0: 'black', 0.75: 'tab:blue', 0.5: 'tab:orange', 0.25: 'tab:red'}
  for r in rows:
    if r['embed_dim'] != embed_dim or r['seed'] != 0:
      continue
    xs, ys = zip(*r['curve'])
    ax.plot([x / 1e6 for x in xs], ys, color=colors.get(r['a'], 'gray'),
            lw=1 + r['steps'] / max(q['steps'] for q in rows), alpha=0.8,
            label=f"a = {r['a']:g}, {r['steps']} steps"
            + ('' if r['finished'] else ' (unfinished)'))
  ax.set_xlabel('tokens seen (millions)')
  ax.set_ylabel('validation loss (nats per token)')
  ax.set_ylim(top=min(5.5, ax.get_ylim()[1]))
  ax.set_title(f'Dense models trained alone, {embed_dim} dims: width against steps', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


def _define_flags():
  flags.DEFINE_list('sweep_dirs', ['runs/capacity', 'runs/capacity_scan'],
                    'Sweep dirs of configs/ablations/capacity.py (main and scan).')
  flags.DEFINE_string('out_dir', 'results/capacity', 'Where scan.md, .json and .png go.')
  flags.DEFINE_integer('embed_dim', 64, 'The shape whose curves scan.png draws.')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  os.makedirs(f.out_dir, exist_ok=True)
  rows = annotate(dense_rows(f.sweep_dirs))
  if not rows:
    sys.exit(f'error: no dense run with logged evaluations in {f.sweep_dirs}.')
  matplotlib.use('Agg')
  with open(os.path.join(f.out_dir, 'scan.md'), 'w') as out:
    out.write(markdown(rows))
  with open(os.path.join(f.out_dir, 'scan.json'), 'w') as out:
    json.dump(rows, out, indent=1)
  plot(rows, f.embed_dim).savefig(os.path.join(f.out_dir, 'scan.png'), dpi=120)
  print(markdown(rows))
  print(f'wrote {f.out_dir}/scan.md, scan.json, scan.png')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
