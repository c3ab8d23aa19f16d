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
             step count (the curves flattening, or not);
  curves.md  when it gets to the gap: at every evaluation step of the recipe's runs, the dense
             a = 1 model's validation loss and, against it (same seed, then the mean over
             seeds), each narrower dense model's gap and the full width's gap of each RA run
             trained from scratch (its variant as collect.py names it): when width starts to
             matter, and when RA starts to pay for sharing its weights;
  curves.json, curves.png  the same.

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

from rag_jax import activation
from rag_jax import configuration
from rag_jax import runs

collect = configuration.load_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'collect.py'))


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


def _workdirs(sweep_dirs: list[str]):
  """(workdir, its completed config) of every run in the sweep dirs."""
  for sweep_dir in sweep_dirs:
    for path in sorted(glob.glob(os.path.join(sweep_dir, '*', 'config.json'))):
      with open(path) as f:
        yield (os.path.dirname(path),
               configuration.complete(ml_collections.ConfigDict(json.load(f))))


def dense_rows(sweep_dirs: list[str]) -> list[dict]:
  rows = []
  for workdir, config in _workdirs(sweep_dirs):
    if activation.is_random(config.activation):
      continue
    curve = sorted(_eval_curve(workdir).items())
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


def _eval_curve(workdir: str) -> dict[int, float]:
  """Step -> the validation loss logged during training (RA runs: at the full width)."""
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return {}
  return {m['step']: m['eval_loss'] for m in _read_metrics(workdir) if 'eval_loss' in m}


def gap_curves(sweep_dirs: list[str], embed_dim: int = 64) -> dict:
  """The gaps along training at `embed_dim`, for the runs of the RA runs' step count: each
  narrower dense model's, and the full width's of each RA variant trained from scratch,
  relative to the dense full-width model of the same seed, then averaged over the seeds that
  have both (an unfinished run counts up to where it got).

  Returns {'steps': [...], 'dense_loss': [mean loss of the dense full width], 'columns':
  {label: {'seeds': n, 'gap': [relative gap or None per step]}}}: dense widths first, widest
  first, then the RA variants; no columns without RA runs or a dense full-width run.
  """
  found = [(w, c) for w, c in _workdirs(sweep_dirs)
           if c.model.embed_dim == embed_dim and not c.get('init_from')]
  ra_steps = [c.num_steps for _, c in found if activation.is_random(c.activation)]
  empty = {'steps': [], 'dense_loss': [], 'columns': {}}
  if not ra_steps:
    return empty
  steps = max(set(ra_steps), key=ra_steps.count)  # the recipe's (the scan varies the dense)
  dense, groups = {}, {}  # dense: (heads, seed) -> curve; groups: label -> seed -> curve
  for workdir, c in found:
    if c.num_steps != steps:
      continue
    if activation.is_random(c.activation):
      name = collect.variant({**c.activation.to_dict(), 'dense': False, 'init_from': '',
                              'num_steps': c.num_steps})
      groups.setdefault(f'RA {name}', {})[c.seed] = _eval_curve(workdir)
    else:
      dense[(c.model.num_heads, c.seed)] = _eval_curve(workdir)
  widest = max((h for h, _ in dense), default=None)
  if widest is None:
    return empty
  base = {seed: curve for (h, seed), curve in dense.items() if h == widest}
  narrower = sorted({h for h, _ in dense if h != widest}, reverse=True)
  groups = {**{f'dense a = {h / widest:g}': {seed: curve for (k, seed), curve in dense.items()
                                             if k == h} for h in narrower},
            **dict(sorted(groups.items()))}
  at = sorted({s for curve in base.values() for s in curve})
  out = {'steps': at, 'dense_loss': [], 'columns': {}}
  for step in at:
    losses = [curve[step] for curve in base.values() if step in curve]
    out['dense_loss'].append(sum(losses) / len(losses))
  for label, by_seed in groups.items():
    seeds = [seed for seed in by_seed if seed in base]
    gaps = []
    for step in at:
      pairs = [by_seed[seed][step] / base[seed][step] - 1 for seed in seeds
               if step in by_seed[seed] and step in base[seed]]
      gaps.append(sum(pairs) / len(pairs) if pairs else None)
    out['columns'][label] = {'seeds': len(seeds), 'gap': gaps}
  return out


def _seeds(n: int) -> str:
  return f"{n} seed{'' if n == 1 else 's'}"


def curves_markdown(curves: dict) -> str:
  labels = list(curves['columns'])
  head = ['step', 'dense a = 1'] + [
      f"{label} ({_seeds(curves['columns'][label]['seeds'])})" for label in labels]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for i, step in enumerate(curves['steps']):
    cells = [str(step), f"{curves['dense_loss'][i]:.4f}"]
    cells += [_pct(curves['columns'][label]['gap'][i]) for label in labels]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot_curves(curves: dict) -> figure.Figure:
  fig = figure.Figure(figsize=(8, 5), layout='constrained')
  ax = fig.add_subplot()
  for label, column in curves['columns'].items():
    points = [(s, 100 * g) for s, g in zip(curves['steps'], column['gap']) if g is not None]
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, ls='--' if label.startswith('dense') else '-', marker='.',
              label=f"{label} ({_seeds(column['seeds'])})")
  ax.axhline(0, color='black', lw=0.8)
  ax.set_xlabel('training step')
  ax.set_ylabel('validation loss against the dense a = 1 model (%)')
  ax.set_title('When width starts to matter (dashed: dense models trained alone) and what '
               'the RA full width pays (solid)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


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
  flags.DEFINE_string('out_dir', 'results/capacity', 'Where scan.* and curves.* go.')
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
  curves = gap_curves(f.sweep_dirs, f.embed_dim)
  if curves['columns']:
    with open(os.path.join(f.out_dir, 'curves.md'), 'w') as out:
      out.write(curves_markdown(curves))
    with open(os.path.join(f.out_dir, 'curves.json'), 'w') as out:
      json.dump(curves, out, indent=1)
    plot_curves(curves).savefig(os.path.join(f.out_dir, 'curves.png'), dpi=120)
    print(curves_markdown(curves))
    print(f'wrote {f.out_dir}/curves.md, curves.json, curves.png')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
