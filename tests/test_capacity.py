"""The capacity experiment (configs/ablations/capacity.py): its sweeps expand to the intended runs
at the intended FLOPs, and the teacher path's fine-tune starts from its parent's exact, reordered
parameters. Data: a small BPE corpus of prepared token arrays made here."""
import json
import os

import jax
import numpy as np
import pytest

from rag_jax import configuration
from rag_jax.data import pipeline as data_lib
from rag_jax import flops
from rag_jax import runs
from rag_jax import sweeps
from rag_jax import train
from rag_jax.data import token_dir
from rag_jax.data import tokenizers
from tests.conftest import ROOT, SHAKESPEARE_TXT

CAPACITY = ROOT / 'configs' / 'ablations' / 'capacity.py'


@pytest.fixture(scope='module')
def capacity():
  return configuration.load_module(str(CAPACITY))


def _dense_shape(run):
  m = run.config.model
  return m.num_heads, m.mlp_dim, run.config.num_steps, run.config.seed


def test_recipe_flops_per_token_by_hand(capacity):
  """4 blocks, 64 dims, heads of 16, 256 units, context 128, 2048 tokens, exact GELU (64 FLOPs):
  per block keys and values 2·64·2·64, queries and output 2·(2·64·64), attention 2·2·128·64,
  MLP 2·2·64·256 + 64·256; the head 2·64·2048."""
  base = capacity.get_config()
  assert capacity.dense_flops(base, 1.0) == 4 * (16384 + 16384 + 32768 + 81920) + 262144
  # a = 0.25: one head of 16 and 64 units (keys and values of the kept head only).
  assert capacity.dense_flops(base, 0.25) == 4 * (4096 + 4096 + 8192 + 20480) + 262144


def test_main_sweep_runs_and_equal_flops(capacity, monkeypatch):
  main = sweeps.expand(f'{CAPACITY}:main')
  dense = [r for r in main if not r.random_activation]
  ra = [r for r in main if r.random_activation]
  assert len(main) == 15 and len(ra) == 3 and all(r.config.data.dataset == 'tokens' for r in main)
  assert sorted(_dense_shape(r) for r in dense) == sorted(
      (h, 64 * h, 4000, s) for h in (4, 3, 2, 1) for s in (0, 1, 2))
  assert {(r.config.activation.train_mode, r.config.activation.distill_weight) for r in ra} == {
      ('sandwich_rule', 0.5)}
  # Each dense model has the RA sub-model's FLOPs per token as exported.
  base = capacity.get_config()
  ra_cfg = runs.make_model(base, capacity.VOCAB).cfg
  for run in dense:
    cfg = runs.make_model(run.config, capacity.VOCAB).cfg
    a = run.config.model.num_heads / 4
    kv_dropped = 2 * cfg.embed_dim * 2 * ra_cfg.head_dim * ra_cfg.num_heads * (1 - a) * 4
    assert flops.flops_per_token(cfg) == pytest.approx(
        flops.flops_per_token(ra_cfg, mlp=a, heads=a) - kv_dropped, rel=1e-12)
  # The equal-FLOPs dense runs cost what the RA run costs to train, within the rounding of their
  # steps to tens (training FLOPs = 3 x forward, over steps x batch x context tokens).
  equal = sweeps.expand(f'{CAPACITY}:equal')
  assert len(equal) == 12
  ra_cost = 3 * capacity._frontier.ra_train_flops(base, capacity.RULE, capacity.VOCAB) * 4000
  for run in equal:
    cfg = runs.make_model(run.config, capacity.VOCAB).cfg
    cost = 3 * flops.flops_per_token(cfg) * run.config.num_steps
    assert cost == pytest.approx(ra_cost, abs=3 * flops.flops_per_token(cfg) * 5)
    assert run.config.num_steps > 4000
  # The whole sweep ('') is main, then teacher, then equal, each run once.
  every = sweeps.expand(str(CAPACITY))
  assert [r.name for r in every] == ([r.name for r in main] +
                                     [r.name for r in sweeps.expand(f'{CAPACITY}:teacher')] +
                                     [r.name for r in sweeps.expand(f'{CAPACITY}:gap')] +
                                     [r.name for r in equal])
  gap = sweeps.expand(f'{CAPACITY}:gap')
  assert len(gap) == 21
  assert sorted((r.config.activation.narrow_weight, r.config.activation.full_warmup_steps,
                 r.config.activation.warmup_reorder) for r in gap) == (
      [(0.5, 0, False)] * 3 + [(1.0, 1000, False)] * 3 + [(1.0, 1000, True)] * 3 +
      [(1.0, 2000, False)] * 3 +
      [(1.0, 3000, False)] * 3 + [(1.0, 3000, True)] * 3 + [(2.0, 0, False)] * 3)


def test_teacher_runs_fine_tune_the_main_sweeps_parents(capacity):
  main = {r.name for r in sweeps.expand(f'{CAPACITY}:main')}
  teacher = sweeps.expand(f'{CAPACITY}:teacher')
  assert len(teacher) == 9
  for run in teacher:
    parent = os.path.basename(run.config.init_from)
    assert parent in main and parent.startswith('buckets=4,') and parent.endswith(
        f'seed={run.config.seed}')
    assert run.config.init_reorder and run.random_activation
    assert run.config.num_steps in (400, 1000, 2000)
    assert run.name.startswith('init_from=path-')


def test_continued_runs_train_each_dense_model_on_for_the_longest_fine_tunes_steps(capacity):
  main = {r.name: r for r in sweeps.expand(f'{CAPACITY}:main')}
  continued = sweeps.expand(f'{CAPACITY}:continued')
  assert len(continued) == 12
  for run in continued:
    parent = main[os.path.basename(run.config.init_from)]
    assert not parent.random_activation and not run.random_activation
    assert run.config.model == parent.config.model and run.config.seed == parent.config.seed
    assert not run.config.init_reorder and run.config.num_steps == 2000
    assert run.config.opt.warmup_steps == 200  # the 2000-step fine-tune's schedule


def test_mixed_runs_fine_tune_the_seed_0_ra_run_with_and_without_the_mixed_pass(capacity):
  main = {r.name: r for r in sweeps.expand(f'{CAPACITY}:main')}
  mixed = sweeps.expand(f'{CAPACITY}:mixed')
  assert sorted(r.config.activation.mixed_share for r in mixed) == [0.0, 0.3]
  for run in mixed:
    parent = main[os.path.basename(run.config.init_from)]
    assert parent.random_activation and parent.config.seed == 0
    assert not run.config.init_reorder and run.config.num_steps == 400
    # Everything but the schedule, the mixed pass and the parent is the parent's recipe.
    assert run.config.activation.train_mode == parent.config.activation.train_mode
    assert run.config.model == parent.config.model


def test_scan_runs(capacity):
  scan = sweeps.expand(f'{CAPACITY}:scan')
  main = {r.name for r in sweeps.expand(f'{CAPACITY}:main')}
  assert len(scan) == 12 and not main & {r.name for r in scan}
  recipe = [r for r in scan if r.config.model.embed_dim == 64]
  assert sorted((r.config.model.num_heads, r.config.num_steps) for r in recipe) == sorted(
      (h, s) for h in (4, 2, 1) for s in (2000, 8000))
  assert all(r.config.opt.warmup_steps < r.config.num_steps for r in scan)


def test_sweep_refuses_a_missing_corpus_before_any_run(tmp_path):
  """The tokens directory is checked when training starts, before compiling: one line."""
  config = configuration.load_config(str(CAPACITY), 'smoke')
  config.data.paths = str(tmp_path / 'no_corpus')
  with pytest.raises(data_lib.DataError, match='no_corpus.*no such directory'):
    data_lib.load(config)


@pytest.fixture(scope='module')
def small_corpus(tmp_path_factory):
  text = SHAKESPEARE_TXT.read_text()[:200_000]
  tokenizer = tokenizers.BPETokenizer.train(text, 300)
  n = len(text)
  parts = {'train': text[:int(0.9 * n)], 'validation': text[int(0.9 * n):int(0.95 * n)],
           'test': text[int(0.95 * n):]}
  out = str(tmp_path_factory.mktemp('corpus') / 'tokens')
  token_dir.write(out, {k: tokenizer.encode(v) for k, v in parts.items()}, tokenizer,
                  {'name': 'shakespeare-bpe'})
  return out


def _smoke(corpus, **overrides):
  config = configuration.load_config(str(CAPACITY), 'smoke')
  config.data.paths = corpus
  config.update(overrides)
  return config


def _set_saved_steps(workdir, steps):
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    text = f.read()
  old = f'"num_steps": {20}'
  assert old in text
  with open(path, 'w') as f:
    f.write(text.replace(old, f'"num_steps": {steps}'))


@pytest.mark.slow
def test_teacher_fine_tune_starts_from_the_reordered_parent(small_corpus, tmp_path):
  parent_dir, child_dir = str(tmp_path / 'parent'), str(tmp_path / 'child')
  parent_cfg = _smoke(small_corpus, num_steps=20, eval_every=20, checkpoint_every=20)
  parent_cfg.activation.enabled = False
  train.train_and_evaluate(parent_cfg, parent_dir)
  # With a zero learning rate, the fine-tune's parameters stay where it started: they must be the
  # parent's, reordered by the same function on the same windows, and compute what the parent does.
  child_cfg = _smoke(small_corpus, init_from=parent_dir, init_reorder=True, num_steps=4,
                     eval_every=4, checkpoint_every=4, log_every=2)
  child_cfg.opt.update(learning_rate=0.0, min_learning_rate=0.0, warmup_steps=1)
  train.train_and_evaluate(child_cfg, child_dir)
  parent, child = runs.load_run(parent_dir), runs.load_run(child_dir)
  assert child.step == 4
  dataset = data_lib.load(child_cfg, parent.tokenizer, ('train',))
  expected = train.reordered(parent, dataset, child_cfg).params
  for got, want in zip(jax.tree.leaves(child.params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(parent.params),
                                                      jax.tree.leaves(child.params)))
  tokens = np.asarray(dataset.splits['train'][:33])[None].astype(np.int32)
  logits = lambda run: run.model.apply({'params': run.params}, tokens[:, :-1])[0]
  np.testing.assert_allclose(logits(child), logits(parent), rtol=1e-4, atol=1e-4)
  # A parent that has not reached its num_steps (still training, or stopped) is refused.
  _set_saved_steps(parent_dir, 40)
  with pytest.raises(runs.WorkdirError, match=r'has not finished \(its newest checkpoint is '
                                              r'step 20 of 40\)'):
    runs.load_init(_smoke(small_corpus, init_from=parent_dir, num_steps=4, eval_every=4))


def _fake_run(root, name, config, evals):
  """A workdir as train leaves it, for the report: config.json and metrics.jsonl."""
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json())
  (workdir / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'train_loss': 9.0, **({'eval_loss': v} if v else {})}) + '\n'
      for s, v in evals))


def test_gap_curves_pair_each_run_with_the_dense_full_width_of_its_seed(capacity, tmp_path):
  """curves.md's numbers: per step, each narrower dense model's and each from-scratch RA run's
  loss relative to the dense a = 1 model of the same seed, averaged over seeds; runs of another
  step count (the scan) or from a parent (the teacher path) are not in it."""
  report = configuration.load_module(str(ROOT / 'experiments' / 'capacity_report.py'))
  base = capacity.get_config()

  def config(seed, a=None, **overrides):
    c = configuration.load_config(str(CAPACITY))
    for key, value in {**(capacity.dense_at(base, a) if a else capacity.RULE), 'seed': seed,
                       **overrides}.items():
      node = c
      *parents, leaf = key.split('.')
      for part in parents:
        node = node[part]
      node[leaf] = value
    return c

  runs_dir = tmp_path / 'runs'
  for seed, full in ((0, 4.0), (1, 5.0)):
    _fake_run(runs_dir, f'dense1_{seed}', config(seed, 1.0), [(250, full), (500, full / 2)])
    _fake_run(runs_dir, f'ra_{seed}', config(seed), [(250, full * 1.1), (500, full * 0.6)])
  _fake_run(runs_dir, 'dense05_0', config(0, 0.5), [(250, 4.4), (400, None), (500, 2.2)])
  _fake_run(runs_dir, 'warm_1', config(1, **{'activation.full_warmup_steps': 100}),
            [(250, 5.0)])  # unfinished: counts up to where it got
  _fake_run(runs_dir, 'scan', config(0, 0.5, num_steps=2000), [(250, 1.0)])
  _fake_run(runs_dir, 'teacher', config(0, init_from='runs/x'), [(250, 1.0)])
  curves = report.gap_curves([str(runs_dir)])
  assert curves['steps'] == [250, 500]
  assert curves['dense_loss'] == pytest.approx([4.5, 2.25])
  columns = curves['columns']
  assert list(columns) == ['dense a = 0.5', 'RA sandwich_rule+distill',
                           'RA sandwich_rule+distill warm-up 100']
  assert columns['dense a = 0.5'] == {'seeds': 1, 'gap': pytest.approx([0.1, 0.1])}
  assert columns['RA sandwich_rule+distill'] == {'seeds': 2, 'gap': pytest.approx([0.1, 0.2])}
  assert columns['RA sandwich_rule+distill warm-up 100'] == {'seeds': 1, 'gap': [0.0, None]}
  table = report.curves_markdown(curves)
  assert '| 500 | 2.2500 | +10.00% | +20.00% |  |' in table
  assert 'RA sandwich_rule+distill (2 seeds)' in table and '(1 seed)' in table
  assert report.gap_curves([str(tmp_path / 'none')]) == {'steps': [], 'dense_loss': [],
                                                         'columns': {}}
