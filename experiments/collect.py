"""Collects a sweep into one table and draws its answer: quality against compute.

    python experiments/collect.py --sweep_dir=DIR [--split=validation]

Reads every DIR/RUN/config.json and DIR/RUN/eval_curve.json (docs/design.md §7) and writes to DIR:

  results.csv, results.json  one row per run and evaluation entry: the run's activation settings
                             (alpha, beta, lam, sites, structure, buckets, ...; a dense run has
                             lam = 0), the policy, active fraction, loss, bits and FLOPs per
                             token, and `pareto` (no other point is cheaper and better);
  summary.md                 one row per run: loss at each fixed fraction and under `random`;
  pareto.png                 loss against FLOPs per token of every run, the quality-compute
                             Pareto front, the dense baseline in black;
  heatmaps.png               when the sweep varies alpha and beta: loss over (alpha, beta) at
                             each lam, at a = 1 and a = 0.5.

The functions are the notebook's API too (notebooks/analysis.ipynb).
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys

from absl import app, flags
import matplotlib
from matplotlib import figure
import ml_collections
import numpy as np
import pandas as pd

from rag_jax import activation
from rag_jax import configuration
from rag_jax import runs
from rag_jax.data import tokenizers

ACTIVATION_COLUMNS = ('alpha', 'beta', 'lam', 'sites', 'structure', 'buckets', 'per_layer',
                      'rescale', 'min_active', 'train_mode', 'sandwich_random', 'distill_weight',
                      'distill_temperature', 'layer_schedule', 'narrow_weight',
                      'full_warmup_steps', 'warmup_reorder', 'mixed_share', 'mixed_routing')
MODEL_COLUMNS = ('num_layers', 'num_heads', 'embed_dim', 'mlp_dim')
ENTRY_COLUMNS = ('policy', 'split', 'active_fraction', 'loss', 'bits_per_token',
                 'flops_per_token', 'step', 'tokens')
HEATMAP_FRACTIONS = (1.0, 0.5)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def run_rows(workdir: str) -> list[dict]:
  """One row per entry of a run's eval_curve.json, with the run's settings."""
  config = _read_json(os.path.join(workdir, 'config.json'))
  act = config['activation']
  dense = not activation.is_random(act)
  settings = {k: act.get(k) for k in ACTIVATION_COLUMNS}
  if dense:  # alpha and beta mean nothing without random activation.
    settings.update(alpha=math.nan, beta=math.nan, lam=0.0)
  common = {'run': os.path.basename(os.path.normpath(workdir)), 'dense': dense, **settings,
            **{k: config['model'][k] for k in MODEL_COLUMNS}, 'seed': config.get('seed', 0),
            'num_steps': config['num_steps'], 'train_flops': train_flops(workdir, config),
            'init_from': config.get('init_from') or '',
            'parent_train_flops': parent_train_flops(workdir, config)}
  return [{**common, **{k: e.get(k) for k in ENTRY_COLUMNS},
           'split': e.get('split', 'validation')}  # evaluate's default split
          for e in _read_json(os.path.join(workdir, 'eval_curve.json'))]


def train_flops(workdir: str, config: dict) -> float:
  """The run's training FLOPs: forward + backward (3x the forward) of every pass of every step,
  drawn widths in expectation, a full-width warm-up at the dense cost
  (activation.run_train_flops_per_token), over num_steps x batch x T tokens."""
  path = os.path.join(workdir, 'tokenizer.json')
  if os.path.exists(path):
    vocab = tokenizers.load(path).vocab_size
  elif config.get('data', {}).get('dataset') == 'tokens' and config['data'].get('vocab_size'):
    vocab = config['data']['vocab_size']  # a prepared corpus's (collected runs keep no tokenizer)
  else:
    return math.nan
  config = configuration.complete(ml_collections.ConfigDict(config))
  per_token = activation.run_train_flops_per_token(
      config.activation, runs.make_model(config, vocab).cfg, config.num_steps)
  return 3 * per_token * config.batch_size * config.model.block_size


def parent_train_flops(workdir: str, config: dict) -> float:
  """The training FLOPs of the run a run started from (`init_from`: the teacher path's dense
  parent), read where it was or, moved with its sweep, beside the run; 0 for a run from
  scratch, NaN where the parent is in neither place."""
  parent = config.get('init_from')
  if not parent:
    return 0.0
  beside = os.path.join(os.path.dirname(os.path.normpath(workdir)),
                        os.path.basename(os.path.normpath(parent)))
  for path in (parent, beside):
    if os.path.exists(os.path.join(path, 'config.json')):
      return train_flops(path, _read_json(os.path.join(path, 'config.json')))
  return math.nan


def pareto_mask(flops, loss) -> np.ndarray:
  """True where no other point has flops <= and loss <= with one of them strictly smaller."""
  flops, loss = np.asarray(flops, float), np.asarray(loss, float)
  dominated = ((flops[None, :] <= flops[:, None]) & (loss[None, :] <= loss[:, None]) &
               ((flops[None, :] < flops[:, None]) | (loss[None, :] < loss[:, None])))
  return ~dominated.any(axis=1)


def load_table(sweep_dir: str) -> pd.DataFrame:
  """Every finished run of `sweep_dir` (long format, one row per evaluation entry).

  Runs without an eval_curve.json are left out and listed in `table.attrs['incomplete']`.
  """
  rows, incomplete = [], []
  for config_path in sorted(glob.glob(os.path.join(sweep_dir, '*', 'config.json'))):
    workdir = os.path.dirname(config_path)
    if os.path.exists(os.path.join(workdir, 'eval_curve.json')):
      rows.extend(run_rows(workdir))
    else:
      incomplete.append(os.path.basename(workdir))
  if not rows:
    raise FileNotFoundError(f'{sweep_dir} holds no run with config.json and eval_curve.json; '
                            'run experiments/sweep.py first.')
  table = pd.DataFrame(rows, columns=list(rows[0]))
  table = table.sort_values(['dense', 'run', 'split', 'policy', 'active_fraction'],
                            ascending=[False, True, True, True, False], ignore_index=True)
  table['pareto'] = False
  for _, group in table.groupby('split'):
    table.loc[group.index, 'pareto'] = pareto_mask(group.flops_per_token, group.loss)
  table.attrs['incomplete'] = incomplete
  return table


def summary(table: pd.DataFrame, split: str = 'validation') -> pd.DataFrame:
  """One row per run: `loss@a` at each fixed fraction a, and the `random` policy's loss and
  mean active fraction."""
  rows = table[table.split == split]
  fixed = rows[rows.policy == 'fixed'].pivot_table(index='run', columns='active_fraction',
                                                   values='loss', aggfunc='first')
  fixed = fixed[sorted(fixed.columns, reverse=True)]
  fixed.columns = [f'loss@{a:g}' for a in fixed.columns]
  random = rows[rows.policy == 'random'].set_index('run')[['loss', 'active_fraction']]
  random.columns = ['loss@random', 'a@random']
  settings = rows.drop_duplicates('run').set_index('run')[['dense', 'alpha', 'beta', 'lam']]
  out = settings.join(fixed).join(random)
  return out.sort_values(['dense', 'run'], ascending=[False, True])


def recipe_steps(rows: pd.DataFrame) -> int:
  """The recipe's step count: the random-activation runs' most common one, fine-tunes of a
  parent (the teacher path, fewer steps) left out when runs from scratch exist."""
  ra = rows[~rows.dense]
  scratch = ra[ra.init_from == ''] if 'init_from' in ra else ra
  return int((scratch if len(scratch) else ra).num_steps.mode().iloc[0])


def best_at(table: pd.DataFrame, fraction: float = 0.5, split: str = 'validation') -> dict:
  """The random-activation run with the lowest loss at a fixed `fraction`, what it gives at
  a = 1, and the dense baseline at both (truncated to `fraction` for the dense model)."""
  fixed = table[(table.split == split) & (table.policy == 'fixed')]
  loss_at = lambda rows, a: rows[np.isclose(rows.active_fraction, a)].set_index('run').loss
  ra = loss_at(fixed[~fixed.dense], fraction)
  if ra.empty:
    raise ValueError(f'no random-activation run was evaluated at a = {fraction:g}.')
  run = ra.idxmin()
  dense = fixed[fixed.dense]
  if not dense.empty:  # several dense sizes (a frontier sweep): the largest is the baseline,
    # trained for the recipe's steps, not an equal-FLOPs run's
    full = dense[np.isclose(dense.active_fraction, 1.0)]
    full = full[full.flops_per_token == full.flops_per_token.max()]
    at_steps = full.num_steps == recipe_steps(fixed)
    dense = dense[dense.run == (full[at_steps] if at_steps.any() else full).run.iloc[0]]
  first_dense = lambda a: float(loss_at(dense, a).iloc[0]) if len(loss_at(dense, a)) else math.nan
  this = fixed[fixed.run == run]
  return {'run': run, 'fraction': fraction, 'loss': float(ra[run]),
          'loss@1': float(loss_at(this, 1.0).iloc[0]) if len(loss_at(this, 1.0)) else math.nan,
          'dense_loss': first_dense(fraction), 'dense_loss@1': first_dense(1.0),
          'flops_per_token': float(this[np.isclose(this.active_fraction, fraction)]
                                   .flops_per_token.iloc[0])}


_MAX_LEGEND = 12  # More runs than this: faint runs share one legend entry.


def plot_pareto(table: pd.DataFrame, split: str = 'validation') -> figure.Figure:
  """Loss against FLOPs per token: each run's fixed-fraction curve, `random`-policy points as
  diamonds, `adaptive` ones (one per threshold) as triangles, the Pareto front as a red step line
  through ringed points, the dense baseline in black. Runs with no point on the front are drawn
  faint."""
  rows = table[table.split == split]
  front = rows[pareto_mask(rows.flops_per_token, rows.loss)].sort_values('flops_per_token')
  fig = figure.Figure(figsize=(9, 5.5), layout='constrained')
  ax = fig.add_subplot()
  runs = list(dict.fromkeys(rows.run))
  colors = dict(zip(runs, _colors(len(runs))))
  dense_runs, front_runs = set(rows[rows.dense].run), set(front.run)
  for run in runs:
    r = rows[rows.run == run]
    dense, on_front = run in dense_runs, run in front_runs
    style = (dict(color='black', marker='*', ms=10, lw=2, ls='--', zorder=3) if dense else
             dict(color=colors[run], marker='o', ms=4, lw=1.5 if on_front else 1,
                  alpha=1 if on_front else 0.35, zorder=2))
    fixed = r[r.policy == 'fixed'].sort_values('flops_per_token')
    # Many runs: only the dense baseline and the runs on the front get a legend entry each.
    label = (f'{run} (dense baseline)' if dense else
             run if on_front or len(runs) <= _MAX_LEGEND else '_nolegend_')
    ax.plot(fixed.flops_per_token, fixed.loss, label=label, **style)
    random = r[r.policy == 'random']
    ax.scatter(random.flops_per_token, random.loss, marker='D', s=25, color=style['color'],
               alpha=style.get('alpha', 1), zorder=2)
    adaptive = r[r.policy == 'adaptive'].sort_values('flops_per_token')
    ax.scatter(adaptive.flops_per_token, adaptive.loss, marker='^', s=25, color=style['color'],
               alpha=style.get('alpha', 1), zorder=2)
  faint = [run for run in runs if run not in front_runs | dense_runs]
  if len(runs) > _MAX_LEGEND and faint:
    ax.plot([], [], color='gray', marker='o', ms=4, alpha=0.35,
            label=f'{len(faint)} other runs (no point on the front)')
  ax.step(front.flops_per_token, front.loss, where='post', color='red', lw=1.2, zorder=4,
          label='Pareto front')
  ax.scatter(front.flops_per_token, front.loss, s=90, facecolors='none', edgecolors='red',
             lw=1.2, zorder=4)
  ax.set_xlabel('FLOPs per token (forward)')
  ax.set_ylabel(f'{split} loss (nats per token)')
  ax.set_title('Quality against compute (lines: fixed widths; diamonds: random; triangles: '
               'adaptive)', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1))
  return fig


def _colors(n: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps['tab20' if n > 10 else 'tab10']
  return [cmap(i % cmap.N) for i in range(n)]


def heatmap_grids(table: pd.DataFrame, fraction: float,
                  split: str = 'validation') -> dict[float, pd.DataFrame] | None:
  """{lam: alpha x beta grid of the loss at a fixed `fraction`}, or None when the sweep does not
  vary (alpha, beta) with one run per (alpha, beta, lam)."""
  rows = table[(table.split == split) & (table.policy == 'fixed') & ~table.dense &
               np.isclose(table.active_fraction, fraction)]
  if rows.empty or rows.duplicated(['alpha', 'beta', 'lam']).any():
    return None
  if len(rows[['alpha', 'beta']].drop_duplicates()) < 2:
    return None
  return {lam: g.pivot(index='alpha', columns='beta', values='loss').sort_index()
          for lam, g in rows.groupby('lam')}


def plot_heatmaps(table: pd.DataFrame, fractions=HEATMAP_FRACTIONS,
                  split: str = 'validation') -> figure.Figure | None:
  """Loss over (alpha, beta): one row per fraction, one panel per lam, one color scale per row,
  the dense baseline's loss at that fraction in each title. None without an (alpha, beta) grid."""
  grids = {a: heatmap_grids(table, a, split) for a in fractions}
  grids = {a: g for a, g in grids.items() if g}
  if not grids:
    return None
  lams = sorted({lam for g in grids.values() for lam in g})
  fig = figure.Figure(figsize=(3.6 * len(lams) + 1, 3.2 * len(grids)), layout='constrained')
  axes = np.asarray(fig.subplots(len(grids), len(lams), squeeze=False))
  dense = table[(table.split == split) & (table.policy == 'fixed') & table.dense]
  for row, (a, by_lam) in enumerate(grids.items()):
    values = np.concatenate([g.to_numpy().ravel() for g in by_lam.values()])
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    base = dense[np.isclose(dense.active_fraction, a)].loss
    for col, lam in enumerate(lams):
      ax = axes[row, col]
      grid = by_lam.get(lam)
      if grid is None:
        ax.axis('off')
        continue
      image = ax.imshow(grid.to_numpy(), cmap='viridis_r', vmin=vmin, vmax=vmax, origin='lower',
                        aspect='auto')
      for (i, j), v in np.ndenumerate(grid.to_numpy()):
        if np.isfinite(v):
          ax.text(j, i, f'{v:.3f}', ha='center', va='center', fontsize=8,
                  color='white' if v > (vmin + vmax) / 2 else 'black')
      ax.set_xticks(range(grid.shape[1]), [f'{b:g}' for b in grid.columns])
      ax.set_yticks(range(grid.shape[0]), [f'{al:g}' for al in grid.index])
      ax.set_xlabel('beta')
      ax.set_ylabel('alpha')
      dense_note = f' (dense {base.iloc[0]:.3f})' if len(base) else ''
      ax.set_title(f'a = {a:g}, lam = {lam:g}{dense_note}', fontsize=9)
    fig.colorbar(image, ax=list(axes[row]), label=f'loss at a = {a:g}', shrink=0.9)
  return fig


def markdown(frame: pd.DataFrame, digits: int = 5) -> str:
  """A DataFrame as a GitHub markdown table (no extra dependency)."""
  frame = frame.reset_index()
  fmt = lambda v: ('' if isinstance(v, float) and math.isnan(v) else
                   f'{v:.{digits}g}' if isinstance(v, float) else str(v))
  lines = ['| ' + ' | '.join(map(str, frame.columns)) + ' |',
           '|' + '---|' * len(frame.columns)]
  lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in frame.itertuples(False)]
  return '\n'.join(lines) + '\n'


def best_line(table: pd.DataFrame, split: str = 'validation', fraction: float = 0.5) -> str:
  """One sentence: the best random-activation run at `fraction` and what it costs at a = 1."""
  try:
    b = best_at(table, fraction, split)
  except ValueError as e:
    return f'({e})'
  return (f"best at a = {fraction:g}: {b['run']}, loss {b['loss']:.4f} (dense truncated to "
          f"{fraction:g}: {b['dense_loss']:.4f}); at a = 1 it has {b['loss@1']:.4f} (dense: "
          f"{b['dense_loss@1']:.4f}).")


def write(table: pd.DataFrame, sweep_dir: str, split: str = 'validation') -> dict[str, str]:
  """Writes the table, its summary and the figures into `sweep_dir`; returns {what: path}."""
  out = {k: os.path.join(sweep_dir, f) for k, f in (
      ('csv', 'results.csv'), ('json', 'results.json'), ('summary', 'summary.md'),
      ('pareto', 'pareto.png'), ('heatmaps', 'heatmaps.png'))}
  table.to_csv(out['csv'], index=False)
  table.to_json(out['json'], orient='records', indent=1)
  with open(out['summary'], 'w') as f:
    f.write(markdown(summary(table, split)) + '\n' + best_line(table, split) + '\n')
  plot_pareto(table, split).savefig(out['pareto'], dpi=120)
  heatmaps = plot_heatmaps(table, split=split)
  if heatmaps is None:
    del out['heatmaps']
  else:
    heatmaps.savefig(out['heatmaps'], dpi=120)
  dense = table[table.dense]
  if dense.mlp_dim.nunique() > 1 or dense.num_layers.nunique() > 1:  # several sizes: a frontier
    result = frontier(table, split)
    out['frontier'] = os.path.join(sweep_dir, 'frontier.md')
    out['frontier_png'] = os.path.join(sweep_dir, 'frontier.png')
    out['frontier_json'] = os.path.join(sweep_dir, 'frontier.json')
    with open(out['frontier'], 'w') as f:
      f.write(frontier_markdown(result))
    with open(out['frontier_json'], 'w') as f:
      json.dump(result, f, indent=1)
    plot_frontier(result, split).savefig(out['frontier_png'], dpi=120)
  return out


# --- The frontier: RA sub-models against dense models trained alone (configs/ablations/frontier.py)


def variant(row) -> str:
  """A run's training kind: 'dense', or the RA train_mode with '+distill' (and, on the `layers`
  site, the blocks it keeps: its layer_schedule, or its structure)."""
  if row['dense']:
    return 'dense'
  distill = row.get('distill_weight') or 0
  name = str(row['train_mode']) + ('+distill' if distill and distill > 0 else '')
  narrow = row.get('narrow_weight')
  if narrow is not None and not pd.isna(narrow) and narrow != 1:
    name += f' narrow×{narrow:g}'
  warm = row.get('full_warmup_steps')
  if warm is not None and not pd.isna(warm) and warm > 0:
    name += f' warm-up {int(warm)}' + (' reordered' if row.get('warmup_reorder') is True else '')
  mixed = row.get('mixed_share')
  if mixed is not None and not pd.isna(mixed) and mixed > 0:
    name += f' mixed {mixed:g}' + (' by gain' if row.get('mixed_routing') == 'gain' else '')
  if row.get('init_from'):  # the teacher path: a fine-tune of a trained parent
    name += f" from dense, {row['num_steps']} steps"
  if 'layers' in str(row.get('sites')):  # which blocks it keeps: '[nested]', '[rising]', ...
    schedule = row.get('layer_schedule')
    name += f" [{row['structure'] if schedule in (None, 'structure') else schedule}]"
  return name


def _stats(values) -> dict:
  v = np.asarray(list(values), float)
  return {'mean': float(v.mean()) if len(v) else math.nan,
          'sd': float(v.std(ddof=1)) if len(v) > 1 else math.nan, 'n': int(len(v))}


def frontier(table: pd.DataFrame, split: str = 'validation') -> dict:
  """Per budget a: the dense models of the sub-model's shape trained alone (at the RA runs'
  steps, and with more steps: equal training FLOPs), the full dense model truncated to a, and
  every RA variant at fixed a, each as mean, sample sd and n over seeds; FLOPs per token of the
  deployed sub-model; and the training cost of each kind of run.

  A dense run's budget is its MLP width times its depth over the largest dense run's (a sweep
  varies one of them: configs/ablations/frontier.py the width, depth.py the depth). Differences
  are called beyond the seed noise when they exceed twice their standard error."""
  rows = table[(table.split == split) & (table.policy == 'fixed')].copy()
  rows['variant'] = [variant(r) for _, r in rows.iterrows()]
  dense = rows[rows.dense]
  if dense.empty or rows[~rows.dense].empty:
    raise ValueError('a frontier needs dense runs and random-activation runs.')
  full_mlp, full_layers = dense.mlp_dim.max(), dense.num_layers.max()
  steps = recipe_steps(rows)
  trained = dense[np.isclose(dense.active_fraction, 1.0)].copy()
  trained['budget'] = trained.mlp_dim / full_mlp * trained.num_layers / full_layers
  full = dense[(dense.mlp_dim == full_mlp) & (dense.num_layers == full_layers)]
  budgets = sorted(set(trained.budget.round(6)), reverse=True)
  out = []
  for a in budgets:
    at = trained[np.isclose(trained.budget, a)]
    row = {'a': a, 'flops_per_token': float(at.flops_per_token.iloc[0]),
           'dense trained': _stats(at[at.num_steps == steps].loss),
           'dense, equal training FLOPs': _stats(at[at.num_steps > steps].loss),
           'equal-FLOPs steps': int(at[at.num_steps > steps].num_steps.max())
           if (at.num_steps > steps).any() else None,
           'dense truncated': _stats(full[(full.num_steps == steps) &
                                          np.isclose(full.active_fraction, a)].loss)}
    ra = rows[~rows.dense & np.isclose(rows.active_fraction, a)]
    for name, group in ra.groupby('variant'):
      row[f'RA {name}'] = _stats(group.loss)
    out.append(row)
  kinds = {}
  for name, group in rows.drop_duplicates('run').groupby('variant'):
    if name == 'dense':
      for (mlp, layers), g in group[group.num_steps == steps].groupby(['mlp_dim', 'num_layers']):
        kinds[f'dense a={mlp / full_mlp * layers / full_layers:g}'] = float(g.train_flops.mean())
    else:  # a fine-tune's cost includes its parent's training
      kinds[f'RA {name}'] = float((group.train_flops + group.get('parent_train_flops', 0)).mean())
  family = sum(v for k, v in kinds.items() if k.startswith('dense a='))
  return {'budgets': out, 'train_flops': kinds, 'dense_family_flops': family, 'steps': steps}


def _cell(s: dict) -> str:
  if not s or not s['n']:
    return ''
  return f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s['n'] > 1 else '') + f" ({s['n']})"


def verdict(ra: dict, dense: dict) -> str:
  """'RA better by d', 'dense better by d', or 'within seed noise (d)': beyond noise when
  |d| > 2 standard errors of the difference (one seed: no verdict)."""
  if not ra or not dense or ra['n'] < 2 or dense['n'] < 2:
    return 'one seed: no verdict'
  d = ra['mean'] - dense['mean']
  se = math.sqrt(ra['sd'] ** 2 / ra['n'] + dense['sd'] ** 2 / dense['n'])
  if abs(d) <= 2 * se:
    return f'within seed noise ({d:+.4f}, 2 SE {2 * se:.4f})'
  return f"{'RA' if d < 0 else 'dense'} better by {abs(d):.4f} (2 SE {2 * se:.4f})"


def frontier_markdown(result: dict) -> str:
  budgets = result['budgets']
  variants = sorted({k for b in budgets for k in b if k.startswith('RA ')})
  columns = ['a', 'FLOPs/token', 'dense trained', 'dense truncated', *variants,
             'dense, equal training FLOPs', 'best RA (seeded) against dense trained']
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for b in budgets:
    # The best variant with seeds to compare (else the best of any).
    ra = [b[v] for v in variants if v in b and b[v]['n']]
    seeded = [s for s in ra if s['n'] > 1] or ra
    best = min(seeded, key=lambda s: s['mean']) if seeded else None
    best_name = next((v for v in variants if v in b and b[v] is best), '')
    equal = _cell(b['dense, equal training FLOPs'])
    if equal:
      equal += f" [{b['equal-FLOPs steps']} steps]"
    cells = [f"{b['a']:g}", f"{b['flops_per_token']:.4g}", _cell(b['dense trained']),
             _cell(b['dense truncated']), *(_cell(b.get(v)) for v in variants), equal,
             f"{best_name[3:]}: {verdict(best, b['dense trained'])}" if best else '']
    lines.append('| ' + ' | '.join(cells) + ' |')
  cost = ['', '| run | training FLOPs | against the dense family |', '|---|---|---|']
  family = result['dense_family_flops']
  for k, v in result['train_flops'].items():
    cost.append(f'| {k} | {v:.3g} | {v / family:.2f}× |' if family else f'| {k} | {v:.3g} | |')
  cost.append(f'| dense family (sum of the dense runs above) | {family:.3g} | 1.00× |')
  return '\n'.join(lines + cost) + '\n'


def plot_frontier(result: dict, split: str = 'validation') -> figure.Figure:
  """Loss against FLOPs per token of the deployed sub-model: dense trained alone (black),
  dense truncated (gray), each RA variant; error bars: one sample sd over seeds."""
  fig = figure.Figure(figsize=(8, 5), layout='constrained')
  ax = fig.add_subplot()
  budgets = result['budgets']
  x = [b['flops_per_token'] for b in budgets]
  series = [('dense trained', dict(color='black', marker='*', ms=10, lw=2)),
            ('dense, equal training FLOPs', dict(color='black', marker='s', ms=5, lw=1, ls=':')),
            ('dense truncated', dict(color='gray', marker='x', lw=1, ls='--'))]
  variants = sorted({k for b in budgets for k in b if k.startswith('RA ')})
  series += [(v, dict(marker='o', ms=5, lw=1.5, color=c)) for v, c in
             zip(variants, _colors(len(variants)))]
  for name, style in series:
    pts = [(xi, b[name]) for xi, b in zip(x, budgets) if b.get(name) and b[name]['n']]
    if not pts:
      continue
    xs, stats = zip(*pts)
    ax.errorbar(xs, [s['mean'] for s in stats],
                yerr=[0 if math.isnan(s['sd']) else s['sd'] for s in stats], label=name,
                capsize=3, **style)
  ax.set_xlabel('FLOPs per token of the (sub-)model as deployed')
  ax.set_ylabel(f'{split} loss (nats per token)')
  ax.set_title('Sub-models of one RA model against dense models trained alone', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def _define_flags():
  flags.DEFINE_string('sweep_dir', None, 'Directory of the sweep\'s workdirs.', required=True)
  flags.DEFINE_enum('split', 'validation', ['train', 'validation', 'test'],
                    'Split of the evaluation entries plotted and summarized.')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  matplotlib.use('Agg')
  sweep_dir, split = flags.FLAGS.sweep_dir, flags.FLAGS.split
  try:
    table = load_table(sweep_dir)
    out = write(table, sweep_dir, split)
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f'error: {e}')
  runs = table.run.nunique()
  print(f'{runs} runs, {len(table)} entries')
  if table.attrs['incomplete']:
    print(f'not finished (no eval_curve.json), left out: {", ".join(table.attrs["incomplete"])}')
  print(markdown(summary(table, split)))
  print(best_line(table, split))
  for what, path in out.items():
    print(f'wrote {what}: {path}')
  if 'heatmaps' not in out:
    print('no heatmaps: this sweep does not vary (alpha, beta) with one run per '
          '(alpha, beta, lam).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
