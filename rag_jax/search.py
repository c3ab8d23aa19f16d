"""Per-layer budgets (MatFormer's Mix'n'Match, Gemma 3n's per-layer slices): for a target FLOPs
per token, which width should each layer's MLP and heads take?

    python -m rag_jax.search --workdir=DIR --active_fraction=0.5 [--batches=8] [--seed=0]
        [--max_evaluations=400] [--out=DIR/plan_0.5.json]

A greedy search on the trained model: start from the full width everywhere; at each step try
narrowing every (layer, site) by one bucket, score each candidate on `batches` random windows of
the validation split (drawn from `seed`), and keep the one that loses the least loss per FLOP
saved, until the plan's FLOPs per token are within the budget: every searched site at
`--active_fraction` of its width (in `evaluate`'s count; a fraction between buckets asks for a
mix). Then swaps: widen one (layer, site) by a bucket and narrow another while the plan stays
within the budget and its loss falls. Every candidate runs as the real narrower network: the
plan's widths are `DrawnWidth`s whose buckets are arguments of one compiled evaluation
(`lax.switch`), so the search compiles once. The search is budgeted by `max_evaluations`
(candidate scorings) and is deterministic given the seed.

The result (JSON) holds the per-layer buckets and widths, the FLOPs, the search history, and the
honest comparison: the plan against the widest uniform width within the same budget, on the
whole validation split and on the test split (the search never saw the test split).
"""
from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from rag_jax import activation
from rag_jax import cli
from rag_jax.data import pipeline as data_lib
from rag_jax import evaluate as evaluate_lib
from rag_jax import files
from rag_jax import flops
from rag_jax import runs
from rag_jax import workdir as workdir_lib

def plan_flops(buckets: dict[str, list[int]], act, cfg) -> float:
  """Forward FLOPs per token of a per-layer plan, in evaluate's count (flops.flops_per_token is
  linear in each layer's fractions, and the layers share one shape: the mean fraction per site)."""
  fractions = {site: float(np.mean([(b + 1) / act.buckets for b in buckets[site]]))
               for site in buckets}
  return flops.flops_per_token(cfg, **fractions)


def search(params, model, act, tokens: np.ndarray, target_flops: float, batches: int = 8,
           batch_size: int = 32, seed: int = 0, max_evaluations: int = 400) -> dict[str, Any]:
  """The greedy per-layer search (module docstring). Returns {'buckets', 'flops_per_token',
  'search_loss', 'evaluations', 'history', 'within_budget'}."""
  cfg = model.cfg
  sites = [s for s in activation.PER_LAYER_SITES if s in activation.parse_sites(act.sites)]
  if not sites:
    raise ValueError(f'the run switches none of {activation.PER_LAYER_SITES} '
                     f'(sites {act.sites!r}): nothing to search.')
  windows = np.stack([data_lib.train_batch(tokens, batch_size, cfg.block_size, seed, i)
                      for i in range(batches)])  # [batches, B, T+1], fixed for the search

  @jax.jit
  def score(buckets_SxL):
    plan = activation.plan_of({s: buckets_SxL[i] for i, s in enumerate(sites)}, act, cfg)
    step = evaluate_lib.make_eval_step(model, lambda key, shape: plan)
    ones = jnp.ones((batch_size,), jnp.float32)
    total = jax.lax.map(lambda w: step(params, w, ones, jax.random.key(0))[0], windows)
    return total.sum() / (batches * batch_size * cfg.block_size)

  top = act.buckets - 1
  state = {s: [top] * cfg.num_layers for s in sites}
  as_array = lambda b: jnp.asarray([b[s] for s in sites], jnp.int32)
  current = float(score(as_array(state)))
  cost = plan_flops(state, act, cfg)
  history = [{'buckets': {s: list(v) for s, v in state.items()}, 'loss': current,
              'flops_per_token': cost}]
  evaluations = 1
  while cost > target_flops * (1 + 1e-9) and evaluations < max_evaluations:
    best = None
    for site in sites:
      for l in range(cfg.num_layers):
        if state[site][l] == 0 or evaluations >= max_evaluations:
          continue
        trial = {s: list(v) for s, v in state.items()}
        trial[site][l] -= 1
        loss = float(score(as_array(trial)))
        evaluations += 1
        saved = cost - plan_flops(trial, act, cfg)
        rate = (loss - current) / saved
        if best is None or rate < best[0]:
          best = (rate, trial, loss)
    if best is None:
      break
    _, state, current = best
    cost = plan_flops(state, act, cfg)
    history.append({'buckets': {s: list(v) for s, v in state.items()}, 'loss': current,
                    'flops_per_token': cost})
  # Then swaps: widen one (layer, site) by a bucket and narrow another, while the plan stays
  # within the budget and the loss falls (a head bucket costs less than an MLP bucket, so the
  # greedy descent alone can stop short of the budget or on the uniform grid).
  improved = True
  while improved and cost <= target_flops * (1 + 1e-9) and evaluations < max_evaluations:
    improved, best = False, None
    slots = [(s, l) for s in sites for l in range(cfg.num_layers)]
    for up in slots:
      for down in slots:
        if (up == down or state[up[0]][up[1]] == top or state[down[0]][down[1]] == 0
            or evaluations >= max_evaluations):
          continue
        trial = {s: list(v) for s, v in state.items()}
        trial[up[0]][up[1]] += 1
        trial[down[0]][down[1]] -= 1
        if plan_flops(trial, act, cfg) > target_flops * (1 + 1e-9):
          continue
        loss = float(score(as_array(trial)))
        evaluations += 1
        if loss < current and (best is None or loss < best[1]):
          best = (trial, loss)
    if best is not None:
      (state, current), improved = best, True
      cost = plan_flops(state, act, cfg)
      history.append({'buckets': {s: list(v) for s, v in state.items()}, 'loss': current,
                      'flops_per_token': cost, 'swap': True})
  return {'buckets': state, 'flops_per_token': cost, 'search_loss': current,
          'evaluations': evaluations, 'history': history,
          'within_budget': cost <= target_flops * (1 + 1e-9)}


def run_search(workdir: str, fraction: float, batches: int = 8, seed: int = 0,
               max_evaluations: int = 400, config_overrides: dict | None = None) -> dict[str, Any]:
  """Loads `workdir` (its saved config changed by `config_overrides`, runs.load_run), searches
  the per-layer plan at the FLOPs of the uniform `fraction`, and scores the plan and the uniform
  width on the whole validation and test splits."""
  if not 0 < fraction <= 1:
    raise ValueError(f'--active_fraction must be in (0, 1], got {fraction}.')
  for name, value, low in (('batches', batches, 1), ('max_evaluations', max_evaluations, 1),
                           ('seed', seed, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'--{name} must be an integer of at least {low}, got {value!r}.')
  config, tokenizer, model, params, step = runs.load_run(workdir, config_overrides)
  act, cfg = config.activation, model.cfg
  activation.validate(act, config.model)
  # The budget: every searched site at `fraction` of its width, not rounded to a bucket (so a
  # fraction between buckets asks for a mix); the uniform comparator is the widest uniform
  # bucket within it.
  target = flops.flops_per_token(cfg, **{s: fraction for s in activation.PER_LAYER_SITES
                                          if s in activation.parse_sites(act.sites)})
  uniform_fraction = max(1, int(fraction * act.buckets + 1e-6)) / act.buckets
  splits = data_lib.load(config, tokenizer, ('validation', 'test')).splits
  result = search(params, model, act, splits['validation'], target, batches,
                  min(config.eval_batch_size, 32), seed, max_evaluations)
  uniform = activation.make_plan(jax.random.key(0), act, cfg, uniform_fraction)
  found = activation.plan_of(result['buckets'], act, cfg, static=True)
  dims = activation.site_dims(cfg)
  result.update(
      workdir=files.absolute(workdir), step=int(step), active_fraction=fraction, seed=seed,
      batches=batches, target_flops_per_token=target,
      uniform_fraction=uniform_fraction,
      uniform_flops_per_token=flops.flops_per_token(
          cfg, **activation.compute_fractions(act, cfg, uniform_fraction)),
      widths={s: [dims[s] * (b + 1) // act.buckets for b in v]
              for s, v in result['buckets'].items()})
  for name, plan in (('plan', found), ('uniform', uniform)):
    step_fn = jax.jit(evaluate_lib.make_eval_step(model, lambda key, shape, p=plan: p))
    for split in ('validation', 'test'):  # one compile serves both splits (same window shape)
      result[f'{name}_{split}_loss'] = evaluate_lib.mean_loss(step_fn, params, splits[split],
                                                              config)[0]
  return result


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A trained random-activation run.', required=True)
  flags.DEFINE_float('active_fraction', 0.5, 'The uniform width whose FLOPs are the budget.')
  flags.DEFINE_integer('batches', 8, 'Validation batches each candidate is scored on.')
  flags.DEFINE_integer('seed', 0, 'Chooses the search windows.')
  flags.DEFINE_integer('max_evaluations', 400, 'Candidate scorings at most (the search budget).')
  flags.DEFINE_string('out', None, 'JSON to write (default: WORKDIR/plan_<fraction>.json).')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  out = f.out or f'{f.workdir}/plan_{f.active_fraction:g}.json'
  try:
    if f.out:  # the default lies in the workdir, which run_search checks
      workdir_lib.check_output_file(out)
    result = run_search(f.workdir, f.active_fraction, f.batches, f.seed, f.max_evaluations,
                        cli.run_overrides())
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  files.write_json(out, result)
  for split in ('validation', 'test'):
    print(f"{split}: per-layer plan {result[f'plan_{split}_loss']:.4f}, uniform "
          f"a={result['uniform_fraction']:g} {result[f'uniform_{split}_loss']:.4f}")
  print(f"widths {result['widths']}; {result['flops_per_token']:.4g} FLOPs/token (budget "
        f"{result['target_flops_per_token']:.4g}); {result['evaluations']} evaluations; "
        f'wrote {out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
