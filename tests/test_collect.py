"""experiments/collect.py on fake runs: workdirs with a real config.json and a made-up curve."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from rag_jax import configuration
from rag_jax import sweeps
from tests.conftest import ROOT

FRACTIONS = (1.0, 0.75, 0.5, 0.25)


collect = configuration.load_module(str(ROOT / 'experiments' / 'collect.py'))


def fake_loss(act, a: float) -> float:
  """Dense: 1.5 at a = 1, +0.8 per unit of width removed. RA: pays 0.05 lam at full width and
  loses less when narrowed, the more so with larger lam and alpha / (alpha + beta)."""
  if not act['enabled']:
    return 1.5 + 0.8 * (1 - a)
  r = act['alpha'] / (act['alpha'] + act['beta'])
  return 1.5 + 0.05 * act['lam'] + (1 - a) * (0.5 - 0.3 * act['lam'] - 0.1 * r)


def write_fake_sweep(sweep_dir, ablation: str) -> list[sweeps.Run]:
  runs = sweeps.expand(str(ROOT / 'configs' / 'ablations' / f'{ablation}.py'))
  for run in runs:
    workdir = os.path.join(sweep_dir, run.name)
    os.makedirs(workdir)
    act = run.config.activation.to_dict()
    entry = lambda a, policy: {'active_fraction': a, 'policy': policy, 'loss': fake_loss(act, a),
                               'bits_per_token': fake_loss(act, a) / math.log(2),
                               'flops_per_token': 1000.0 * a, 'split': 'validation',
                               'step': 60, 'tokens': 4096, 'structure': act['structure'],
                               'sites': act['sites']}
    curve = [entry(a, 'fixed') for a in FRACTIONS]
    if run.random_activation:
      curve.append(entry(1 - act['lam'] * act['alpha'] / (act['alpha'] + act['beta']), 'random'))
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(run.config.to_dict(), f)
    with open(os.path.join(workdir, 'eval_curve.json'), 'w') as f:
      json.dump(curve, f)
  return runs


@pytest.fixture(scope='module')
def abl_dir(tmp_path_factory):
  sweep_dir = str(tmp_path_factory.mktemp('abl'))
  write_fake_sweep(sweep_dir, 'alpha_beta_lambda')
  os.makedirs(os.path.join(sweep_dir, 'unfinished'))  # config.json only: still training.
  with open(os.path.join(sweep_dir, 'unfinished', 'config.json'), 'w') as f:
    json.dump({}, f)
  return sweep_dir


def test_table_has_every_entry_of_every_run(abl_dir):
  table = collect.load_table(abl_dir)
  assert len(table) == 27 * 5 + 4  # RA runs: 4 fixed fractions and random; dense: 4.
  assert table.run.nunique() == 28
  assert table.attrs['incomplete'] == ['unfinished']
  dense = table[table.dense]
  assert set(dense.run) == {'enabled=False'} and table.run.iloc[0] == 'enabled=False'
  assert (dense.lam == 0).all() and dense.alpha.isna().all()
  row = table[(table.run == 'alpha=2,beta=0.5,lam=0.25') & (table.active_fraction == 0.5)]
  assert row[['alpha', 'beta', 'lam', 'sites', 'structure', 'buckets']].iloc[0].tolist() == [
      2.0, 0.5, 0.25, 'mlp,heads', 'nested', 4]
  assert row.loss.iloc[0] == pytest.approx(1.5 + 0.0125 + 0.5 * (0.5 - 0.075 - 0.08))
  assert set(table.columns) >= {'policy', 'split', 'active_fraction', 'loss', 'bits_per_token',
                                'flops_per_token', 'num_steps', 'pareto', 'train_mode'}


def test_verdict_by_hand():
  """d = -0.2, SE of the difference sqrt(0.1^2/4 + 0.1^2/4) = 0.0707: beyond two SE."""
  ra, dense = {'mean': 1.0, 'sd': 0.1, 'n': 4}, {'mean': 1.2, 'sd': 0.1, 'n': 4}
  assert collect.verdict(ra, dense) == 'RA better by 0.2000 (2 SE 0.1414)'
  assert collect.verdict(dense, ra) == 'dense better by 0.2000 (2 SE 0.1414)'
  near = {'mean': 1.1, 'sd': 0.1, 'n': 4}  # d = -0.1 < 0.1414
  assert collect.verdict(near, dense) == 'within seed noise (-0.1000, 2 SE 0.1414)'
  assert collect.verdict({**ra, 'n': 1}, dense) == 'one seed: no verdict'


def test_pareto_front():
  flops = [1, 2, 2, 3, 3, 4]
  loss = [3, 2, 2.5, 2, 1, 1]
  np.testing.assert_array_equal(collect.pareto_mask(flops, loss),
                                [True, True, False, False, True, False])


def test_pareto_column_marks_exactly_the_undominated_points(abl_dir):
  table = collect.load_table(abl_dir)
  # The column is pareto_mask of the table's own columns (the rule is checked by hand in
  # test_pareto_front), and some points are off the front.
  np.testing.assert_array_equal(table.pareto.to_numpy(),
                                collect.pareto_mask(table.flops_per_token, table.loss))
  assert 0 < table.pareto.sum() < len(table)
  # Dense is best at full width; at a = 0.5 the best RA run beats it.
  front = table[table.pareto]
  assert front[front.active_fraction == 1.0].run.tolist() == ['enabled=False']
  assert 'alpha=2,beta=0.5,lam=0.75' in set(front.run)


def test_summary_and_best(abl_dir):
  table = collect.load_table(abl_dir)
  summary = collect.summary(table)
  assert len(summary) == 28 and summary.index[0] == 'enabled=False'
  assert list(summary.columns) == ['dense', 'alpha', 'beta', 'lam', 'loss@1', 'loss@0.75',
                                   'loss@0.5', 'loss@0.25', 'loss@random', 'a@random']
  assert np.isnan(summary.loc['enabled=False', 'loss@random'])
  best = collect.best_at(table, 0.5)
  assert best['run'] == 'alpha=2,beta=0.5,lam=0.75'
  assert best['loss'] == pytest.approx(1.75 - 0.075 - 0.04)
  assert best['loss@1'] == pytest.approx(1.5375)
  assert best['dense_loss'] == pytest.approx(1.9) and best['dense_loss@1'] == pytest.approx(1.5)
  assert best['flops_per_token'] == 500.0


def test_best_at_compares_with_the_dense_model_of_the_recipes_steps():
  """A dense model of the full width trained for more steps (an equal-FLOPs run, named first)
  is not the baseline: the one trained for the recipe's steps is."""
  rows = []
  for run, dense, steps, loss in [('a_long', True, 9000, 1.2), ('b_recipe', True, 4000, 1.5),
                                  ('c_recipe_s1', True, 4000, 1.51), ('ra', False, 4000, 1.6)]:
    for a in FRACTIONS:
      rows.append({'run': run, 'dense': dense, 'num_steps': steps, 'split': 'validation',
                   'policy': 'fixed', 'active_fraction': a, 'flops_per_token': 1000.0 * a,
                   'loss': loss + (1 - a) * (0.1 if not dense else 1.0)})
  best = collect.best_at(pd.DataFrame(rows), 0.5)
  assert best['run'] == 'ra' and best['dense_loss@1'] == 1.5 and best['dense_loss'] == 2.0


def test_heatmap_grids(abl_dir):
  table = collect.load_table(abl_dir)
  grids = collect.heatmap_grids(table, 0.5)
  assert sorted(grids) == [0.25, 0.5, 0.75]
  grid = grids[0.25]
  assert grid.index.tolist() == [0.5, 1.0, 2.0] and grid.columns.tolist() == [0.5, 1.0, 2.0]
  assert grid.loc[2.0, 0.5] == pytest.approx(1.5 + 0.0125 + 0.5 * (0.5 - 0.075 - 0.08))


def test_write_table_and_figures(abl_dir, tmp_path):
  table = collect.load_table(abl_dir)
  out = collect.write(table, str(tmp_path))
  assert set(out) == {'csv', 'json', 'summary', 'pareto', 'heatmaps'}
  for path in out.values():
    assert os.path.getsize(path) > 0
  for key in ('pareto', 'heatmaps'):
    with open(out[key], 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  csv = pd.read_csv(out['csv'])
  assert len(csv) == len(table) and csv.loss.tolist() == pytest.approx(table.loss.tolist())
  with open(out['json']) as f:
    records = json.load(f)
  assert len(records) == len(table) and records[0]['run'] == 'enabled=False'
  with open(out['summary']) as f:
    lines = f.read().splitlines()
  assert len(lines) == 2 + 28 + 2
  assert lines[2].startswith('| enabled=False | True |  |  | 0 | 1.5 |')
  assert lines[-1] == collect.best_line(table) and lines[-1].startswith('best at a = 0.5: ')


def test_a_sweep_without_an_alpha_beta_grid_has_no_heatmaps(tmp_path):
  write_fake_sweep(str(tmp_path), 'sites')
  table = collect.load_table(str(tmp_path))
  assert table.run.nunique() == 8
  assert collect.heatmap_grids(table, 0.5) is None and collect.plot_heatmaps(table) is None
  assert 'heatmaps' not in collect.write(table, str(tmp_path))
  assert os.path.exists(tmp_path / 'pareto.png')


def test_empty_sweep_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='holds no run'):
    collect.load_table(str(tmp_path))


FRONTIER = ROOT / 'configs' / 'ablations' / 'frontier.py'


def test_frontier_sweep_expands_to_dense_models_at_the_sub_models_flops():
  """Each dense model of the frontier has the FLOPs per token of the RA sub-model it is matched
  to (exactly: the same shape), and the equal-FLOPs ones cost what the `single` RA run costs to
  train, within the 10 steps they are rounded to."""
  from rag_jax import activation, flops, runs
  frontier_file = configuration.load_module(str(FRONTIER))
  base = frontier_file.get_config()
  expanded = sweeps.expand(str(FRONTIER))
  dense = [r for r in expanded if not r.random_activation]
  ra = [r for r in expanded if r.random_activation]
  assert len(dense) == 21 and len(ra) == 12  # 3 seeds x (4 + 3 dense, 4 RA)
  assert len(sweeps.expand(f'{FRONTIER}:smoke')) == 6  # one seed, a = 1 and 0.5, 4 RA
  large = sweeps.expand(f'{FRONTIER}:large')  # 3 seeds x (4 dense, distill, rule)
  assert len(large) == 18 and {r.config.model.num_heads for r in large} == {8, 6, 4, 2}
  routed = sweeps.expand(f'{FRONTIER}:routed')  # the large `rule` run with a mixed pass
  rule = next(r for r in large if r.config.activation.train_mode == 'sandwich_rule')
  assert len(routed) == 6 and {r.config.model.to_dict() == rule.config.model.to_dict()
                               for r in routed} == {True}
  assert {(r.config.activation.mixed_routing, r.config.activation.mixed_share, r.config.seed)
          for r in routed} == {(m, 0.2, s) for m in ('random', 'gain') for s in (0, 1, 2)}
  big = runs.make_model(large[0].config, 65).cfg
  params = big.num_layers * (4 * big.embed_dim * big.attn_dim + 2 * big.embed_dim * big.mlp_dim)
  assert params + (65 + big.block_size) * big.embed_dim >= 5_000_000  # the second size
  assert {r.config.seed for r in expanded} == {0, 1, 2}
  ra_cfg = runs.make_model(base, 65).cfg
  for run in dense:
    cfg = runs.make_model(run.config, 65).cfg
    a = cfg.mlp_dim / base.model.mlp_dim
    assert a in (1.0, 0.75, 0.5, 0.25) and cfg.num_heads == base.model.num_heads * a
    sub = flops.flops_per_token(ra_cfg, mlp=a, heads=a)  # the RA model's parallel pass at a
    kv_all_heads = 2 * cfg.embed_dim * 2 * ra_cfg.attn_dim * (1 - a) * cfg.num_layers
    assert flops.flops_per_token(cfg) == pytest.approx(sub - kv_all_heads, rel=1e-12)
    assert flops.flops_per_token(cfg) == frontier_file.dense_flops(base, a)
    if run.config.num_steps != base.num_steps:
      ra_cost = activation.train_flops_per_token(base.activation, ra_cfg) * base.num_steps
      dense_cost = flops.flops_per_token(cfg) * run.config.num_steps
      assert abs(dense_cost / ra_cost - 1) < 5 / run.config.num_steps
  modes = {(r.config.activation.train_mode, r.config.activation.distill_weight) for r in ra}
  assert modes == {('single', 0.0), ('sandwich', 0.0), ('sandwich', 0.5), ('sandwich_rule', 0.5)}


def test_frontier_table_and_verdicts(tmp_path):
  """collect's frontier on fake runs of the frontier sweep: RA `sandwich` beats the dense models
  at a = 0.5 by more than the seed noise, ties at a = 1, loses at a = 0.25."""
  from rag_jax.data import tokenizers
  expanded = sweeps.expand(str(FRONTIER))
  rng = np.random.default_rng(0)
  for run in expanded:
    workdir = tmp_path / run.name
    workdir.mkdir()
    c = run.config
    act = c.activation
    a_dense = c.model.mlp_dim / 512
    base = {1.0: 1.89, 0.75: 1.93, 0.5: 1.98, 0.25: 2.10}
    def loss(a):
      if not (act.enabled and act.lam > 0):
        trained = base[a_dense] - (0.02 if c.num_steps > 2000 else 0.0)
        return trained + 0.8 * (1 - a) + rng.normal(0, 0.003)
      ra = {1.0: 1.90, 0.75: 1.91, 0.5: 1.93, 0.25: 2.5}[a]  # sandwich: 1.89 at a = 1, a tie
      return ra - (0.01 if act.train_mode != 'single' else 0.0) + rng.normal(0, 0.003)
    fractions = (1.0, 0.75, 0.5, 0.25)
    curve = [{'active_fraction': a, 'policy': 'fixed', 'loss': loss(a), 'split': 'validation',
              'flops_per_token': 1e6 * a} for a in fractions]
    (workdir / 'config.json').write_text(json.dumps(c.to_dict()))
    (workdir / 'eval_curve.json').write_text(json.dumps(curve))
    tokenizers.save(tokenizers.CharTokenizer(''.join(chr(33 + i) for i in range(65))),
                    str(workdir / 'tokenizer.json'))
  table = collect.load_table(str(tmp_path))
  result = collect.frontier(table)
  budgets = {b['a']: b for b in result['budgets']}
  assert sorted(budgets) == [0.25, 0.5, 0.75, 1.0]
  assert budgets[0.5]['dense trained']['n'] == 3 and budgets[0.5]['RA sandwich']['n'] == 3
  assert budgets[0.5]['equal-FLOPs steps'] > 2000
  assert collect.verdict(budgets[0.5]['RA sandwich'], budgets[0.5]['dense trained']).startswith(
      'RA better')
  assert collect.verdict(budgets[0.25]['RA sandwich'], budgets[0.25]['dense trained']).startswith(
      'dense better')
  assert collect.verdict(budgets[1.0]['RA sandwich'], budgets[1.0]['dense trained']).startswith(
      'within seed noise')
  costs = result['train_flops']
  assert costs['RA single'] < costs['RA sandwich'] < costs['RA sandwich_rule+distill']
  assert costs['RA single'] < result['dense_family_flops']
  text = collect.frontier_markdown(result)
  assert text.count('\n| 0.5 |') == 1 and 'dense family' in text
  out = collect.write(table, str(tmp_path))
  assert os.path.exists(out['frontier_png']) and os.path.exists(out['frontier'])


DEPTH = ROOT / 'configs' / 'ablations' / 'depth.py'


def test_depth_sweep_and_its_frontier(tmp_path):
  """configs/ablations/depth.py: the three layer schedules on the `layers` site and dense models
  of 1-4 blocks, 3 seeds; collect's frontier puts a dense model of k blocks at budget k / 4 and
  names each RA run by the blocks it keeps."""
  from rag_jax.data import tokenizers
  expanded = sweeps.expand(str(DEPTH))
  assert len(expanded) == 21 and len(sweeps.expand(f'{DEPTH}:smoke')) == 4
  ra = [r for r in expanded if r.random_activation]
  assert {(r.config.activation.layer_schedule, r.config.seed) for r in ra} == {
      (s, seed) for s in ('structure', 'spaced', 'rising') for seed in (0, 1, 2)}
  assert all(r.config.activation.sites == 'layers' for r in expanded)
  rng = np.random.default_rng(0)
  for run in expanded:
    workdir = tmp_path / run.name
    workdir.mkdir()
    c = run.config
    depth = c.model.num_layers / 4
    shift = {'structure': 0.0, 'spaced': 0.02, 'rising': -0.02}.get(c.activation.layer_schedule)
    loss = lambda a: ((2.0 - 0.1 * depth - 0.3 * (1 - a)) if not c.activation.enabled else
                      1.90 + 0.1 * (1 - a) + shift) + rng.normal(0, 0.002)
    curve = [{'active_fraction': a, 'policy': 'fixed', 'loss': loss(a), 'split': 'validation',
              'flops_per_token': 1e6 * a * depth} for a in FRACTIONS]
    (workdir / 'config.json').write_text(json.dumps(c.to_dict()))
    (workdir / 'eval_curve.json').write_text(json.dumps(curve))
    tokenizers.save(tokenizers.CharTokenizer(''.join(chr(33 + i) for i in range(65))),
                    str(workdir / 'tokenizer.json'))
  table = collect.load_table(str(tmp_path))
  assert set(table[~table.dense].apply(collect.variant, axis=1)) == {
      'single [nested]', 'single [spaced]', 'single [rising]'}
  budgets = {b['a']: b for b in collect.frontier(table)['budgets']}
  assert sorted(budgets) == [0.25, 0.5, 0.75, 1.0]
  assert budgets[0.5]['dense trained']['mean'] == pytest.approx(1.95, abs=0.01)
  assert budgets[0.5]['RA single [rising]']['n'] == 3
  assert collect.verdict(budgets[0.5]['RA single [rising]'],
                         budgets[0.5]['dense trained']).startswith('RA better')
  out = collect.write(table, str(tmp_path))
  assert 'single [rising]' in open(out['frontier']).read()


def test_variant_names_each_training_change():
  rule = {'dense': False, 'train_mode': 'sandwich_rule', 'distill_weight': 0.5}
  assert collect.variant(rule) == 'sandwich_rule+distill'
  assert collect.variant({**rule, 'narrow_weight': 1.0, 'full_warmup_steps': 0}) == \
      'sandwich_rule+distill'
  assert collect.variant({**rule, 'narrow_weight': 2.0}) == 'sandwich_rule+distill narrow×2'
  assert collect.variant({**rule, 'full_warmup_steps': 1000}) == \
      'sandwich_rule+distill warm-up 1000'
  assert collect.variant({**rule, 'full_warmup_steps': 3000, 'warmup_reorder': True}) == \
      'sandwich_rule+distill warm-up 3000 reordered'
  assert collect.variant({**rule, 'init_from': 'runs/x', 'num_steps': 400}) == \
      'sandwich_rule+distill from dense, 400 steps'
  assert collect.variant({'dense': True}) == 'dense'


def test_the_routed_runs_are_told_apart(tmp_path):
  """collect's rows of frontier.py:routed name the mixed pass and how it routes (the random
  and the gain-routed runs are two variants, not one)."""
  names = set()
  for run in sweeps.expand(f'{FRONTIER}:routed'):
    workdir = tmp_path / run.name
    workdir.mkdir()
    (workdir / 'config.json').write_text(json.dumps(run.config.to_dict()))
    (workdir / 'eval_curve.json').write_text(json.dumps([
        {'active_fraction': 1.0, 'policy': 'fixed', 'loss': 1.7, 'flops_per_token': 1e6}]))
    names |= {collect.variant(row) for row in collect.run_rows(str(workdir))}
  assert names == {'sandwich_rule+distill mixed 0.2', 'sandwich_rule+distill mixed 0.2 by gain'}
