"""Loss and bits per token of a trained run, written to `eval_curve.json`.

    python -m rag_jax.evaluate --workdir=DIR [--active_fractions=1,0.5] [--policy=fixed] \
        [--split=test]

Each entry of eval_curve.json: active_fraction, policy, loss (nats per token), bits_per_token,
flops_per_token (analytic forward count, flops.flops_per_token), plus split, step and
the number of tokens scored. Entries of other (active_fraction, policy, split) are kept.
"""
from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from rag_jax import activation
from rag_jax import cli
from rag_jax.data import pipeline as data_lib
from rag_jax import files
from rag_jax import flops
from rag_jax import losses
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import runs
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

POLICIES = policies.EVALUATED
ADAPTIVE_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
ROUTER_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)  # predicted gains (nats) with --router


def plan_fn(act, model_cfg, policy: str = 'fixed', fraction: float | None = None):
  """(key, batch shape) -> the activation plan of an eval batch under `policy` (its
  policies.Policy.eval_plan), or None for the dense model (`fixed` at None or at a nested 1).

  `fixed`: static widths at `fraction` (units chosen by the key for random/bernoulli).
  `random`: a fresh draw at every position of every window, as masks; the loss is what
  token-by-token generation with per-token draws computes.
  """
  if policy not in ('fixed', 'random'):
    raise ValueError(f'--policy must be one of {POLICIES}, got {policy!r}.')
  chosen = (policies.Fixed(act=None) if policy == 'fixed' and fraction is None
            else policies.make(policy, act, fraction=fraction))
  if isinstance(chosen, policies.Fixed) and chosen.is_dense:
    return None
  return lambda key, shape: chosen.eval_plan(key, model_cfg, shape[0], shape[1] - 1)


def make_eval_step(model: gpt.GPT, plan_for=None):
  """(params, tokens_Bx(T+1), weights_B, key) -> (summed loss, number of scored tokens)."""

  def eval_step(params, tokens, weights_B, key):
    plan = None if plan_for is None else plan_for(key, tokens.shape)
    logits_BxTxV, _ = model.apply({'params': params}, tokens[:, :-1], plan=plan)
    losses_BxT = losses.token_losses(logits_BxTxV, tokens[:, 1:])
    return (losses_BxT.sum(-1) * weights_B).sum(), weights_B.sum() * losses_BxT.shape[1]

  return eval_step


def split_sums(eval_step, params, tokens: np.ndarray, config, batch_sharding=None,
               key: jax.Array | None = None):
  """The outputs of `eval_step` (summed losses, counts: any tree of arrays) summed over the
  windows of a split (data.eval_batches), as float64 numpy. Batch i gets the activation key
  fold_in(key, i)."""
  key = jax.random.key(0) if key is None else key
  total = None
  for i, (batch, weights) in enumerate(data_lib.eval_batches(
      tokens, config.model.block_size, config.eval_batch_size, config.eval_batches)):
    if batch_sharding is not None:
      batch, weights = data_lib.put((batch, weights), batch_sharding)
    out = jax.tree.map(lambda x: np.asarray(x, np.float64),
                       eval_step(params, batch, weights, jax.random.fold_in(key, i)))
    total = out if total is None else jax.tree.map(np.add, total, out)
  return total


def mean_loss(eval_step, params, tokens: np.ndarray, config, batch_sharding=None,
              key: jax.Array | None = None) -> tuple[float, int]:
  """Mean next-token loss over a split (windows from data.eval_batches); returns (loss, count).
  Batch i gets the activation key fold_in(key, i)."""
  total, count = split_sums(eval_step, params, tokens, config, batch_sharding, key)
  return float(total) / float(count), int(count)


def make_adaptive_step(model: gpt.GPT, act, draft_fraction: float, thresholds, router=None):
  """(params, tokens_Bx(T+1), weights_B, key) -> (summed loss per threshold, escalated tokens
  per threshold, scored tokens) of the `adaptive` policy (see `evaluate_adaptive`); with a
  `router` (router_lib.Router) the thresholds are predicted gains."""
  policy = policies.Adaptive(act=policies.Act(act), fraction=draft_fraction, router=router)

  def step(params, tokens, weights_B, key):
    del key
    x_BxT, y_BxT = tokens[:, :-1], tokens[:, 1:]
    narrow = policy.narrow(model.cfg)
    if router is None:
      narrow_BxTxV, _ = model.apply({'params': params}, x_BxT, plan=narrow)
      signal_BxT = policy.signal(narrow_BxTxV)
    else:
      (narrow_BxTxV, _), hidden = router_lib.apply_with_hidden(model, {'params': params}, x_BxT,
                                                               plan=narrow)
      signal_BxT = policy.signal(narrow_BxTxV, hidden)
    w_BxT = weights_B[:, None] * jnp.ones(y_BxT.shape, jnp.float32)

    def one(threshold):
      escalate_BxT, plan = policy.eval_plans(signal_BxT, model.cfg, threshold)
      logits_BxTxV, _ = model.apply({'params': params}, x_BxT, plan=plan)
      losses_BxT = losses.token_losses(logits_BxTxV, y_BxT)
      return (losses_BxT * w_BxT).sum(), (escalate_BxT * w_BxT).sum()

    total, escalated = jax.lax.map(one, jnp.asarray(thresholds, jnp.float32))
    return total, escalated, w_BxT.sum()

  return step


def update_eval_curve(workdir: str, entries: list[dict]) -> list[dict]:
  path = os.path.join(workdir, workdir_lib.EVAL_CURVE_FILE)
  # One entry per (fraction, policy, split); adaptive ones per (threshold, draft width, router).
  key = lambda e: ((e['policy'], e.get('split'), e['threshold'], e['draft_fraction'],
                    bool(e.get('router')))
                   if e['policy'] == 'adaptive'
                   else (e['active_fraction'], e['policy'], e.get('split')))
  old = []
  if files.exists(path):
    try:
      old = files.read_json(path)
    except json.JSONDecodeError:  # keep it for inspection; write a fresh curve.
      files.path(path).rename(path + '.damaged')
  new_keys = {key(e) for e in entries}
  curve = [e for e in old if key(e) not in new_keys] + entries
  curve.sort(key=lambda e: (e.get('split') or '', e['policy'], -e['active_fraction']))
  files.write_json(path, curve)
  return curve


def evaluate(workdir: str, active_fractions=None, policy: str = 'fixed',
             split: str = 'validation', overrides: dict | None = None,
             draft_fraction: float | None = 0.5, thresholds=ADAPTIVE_THRESHOLDS,
             config_overrides: dict | None = None, router: bool = False) -> list[dict]:
  """Scores the newest checkpoint at each fixed fraction, under the random policy, or under
  the adaptive policy (`draft_fraction`, `thresholds`, `router`: `evaluate_adaptive`).

  The activation settings are the run's `config.activation` updated by `overrides` (e.g.
  alpha/beta/lam for the random policy, or structure/sites); on a dense run, fixed fractions
  below 1 score the dense model truncated to those widths (nested prefixes by default).
  `active_fractions=None`: every width a nested RA run computes (its buckets), 1 otherwise.
  `config_overrides`: {dotted field: value} changing the saved config (runs.load_run), e.g.
  {'data.paths': ..., 'dtype': 'float32'}.
  """
  if policy not in POLICIES:
    raise ValueError(f'--policy must be one of {POLICIES}, got {policy!r}.')
  if policy == 'adaptive':
    return evaluate_adaptive(workdir, draft_fraction, thresholds, split, overrides,
                             config_overrides, router)
  if router:
    raise ValueError('--router goes with --policy=adaptive.')
  if policy == 'fixed' and active_fractions is not None and not len(active_fractions):
    raise ValueError('--active_fractions is empty; give the fractions to score, e.g. 1,0.5,0.25.')
  for a in active_fractions or ():
    if not 0 < a <= 1:
      raise ValueError(f'active fractions must be in (0, 1], got {a}.')
  def check(act):
    if policy == 'random':
      activation.check_draws(act, '--policy=random would score the dense model')

  narrower = policy != 'fixed' or (active_fractions is not None and min(active_fractions) < 1)
  config, model, params, step, act, tokens = _load(workdir, split, overrides, check, narrower,
                                                   config_overrides)
  cfg = model.cfg
  if active_fractions is None:
    active_fractions = ([(j + 1) / act.buckets for j in reversed(range(act.buckets))]
                        if act.enabled and act.structure == 'nested' and not cfg.per_layer
                        else [1.0])
  if cfg.per_layer and (policy != 'fixed' or min(active_fractions) < 1):
    raise ValueError(f'{workdir} holds blocks of their own widths (an export of a per-layer '
                     'plan): it scores at --active_fractions=1 only (truncation takes one width '
                     'per site).')
  eval_key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], 1)
  entries = []
  for fraction in (active_fractions if policy == 'fixed' else [None]):
    eval_step = jax.jit(make_eval_step(model, plan_fn(act, cfg, policy, fraction)))
    loss, count = mean_loss(eval_step, params, tokens, config, key=eval_key)
    compute = activation.compute_fractions(act, cfg, fraction)
    sites = activation.parse_sites(act.sites)
    realized = [compute[s] for s in sites] or [1.0]
    entry = {'active_fraction': float(fraction) if fraction is not None else
             float(np.mean(realized)), 'policy': policy, 'loss': loss,
             'bits_per_token': loss / math.log(2),
             'flops_per_token': flops.flops_per_token(cfg, **compute),
             'relative_flops': flops.flops_per_token(cfg, **compute) / flops.flops_per_token(cfg),
             'split': split,
             'step': int(step), 'tokens': count, 'structure': act.structure,
             'sites': act.sites}
    if 'layers' in sites:
      entry['layer_schedule'] = activation.setting(act, 'layer_schedule')
    if policy == 'random':
      entry.update(alpha=act.alpha, beta=act.beta, lam=act.lam)
    entries.append(entry)
  update_eval_curve(workdir, entries)
  return entries


def _load(workdir: str, split: str, overrides: dict | None, check, widths: bool = True,
          config_overrides: dict | None = None):
  """(config, model, params, step, activation settings, the split's tokens) of the run in
  `workdir` to score: its activation updated by `overrides` and validated, `check(act)` for
  what a policy needs, the workdir checked writable before the work (no result is lost)."""
  config, tokenizer, model, params, step = runs.load_run(workdir, config_overrides)
  act = config.activation
  if overrides:
    act.update({k: v for k, v in overrides.items() if v is not None})
  if act.enabled or widths:  # a dense run scored at a = 1 uses none of its activation settings
    activation.validate(act, config.model)
  check(act)
  workdir_lib.check_writable(workdir)
  if split not in data_lib.SPLITS:
    raise ValueError(f'--split must be one of {data_lib.SPLITS}, got {split!r}.')
  return config, model, params, step, act, data_lib.load(config, tokenizer, (split,)).splits[split]


def evaluate_adaptive(workdir: str, draft_fraction: float | None = 0.5,
                      thresholds=ADAPTIVE_THRESHOLDS, split: str = 'validation',
                      overrides: dict | None = None, config_overrides: dict | None = None,
                      router: bool = False) -> list[dict]:
  """The `adaptive` policy, teacher-forced: every token first runs at the nested width
  `draft_fraction`; where that width's top-1 probability is below a threshold the token
  escalates to the full width. Scored in two parallel passes per window: the narrow one gives
  each position's confidence, the second computes every position at its chosen width
  (per-position masks, so each token's keys and values are those of its own width, as in
  generation). Approximation: in generation the confidence of token t would come from a context
  of mixed widths; here it comes from the narrow pass. Realized FLOPs per token: the narrow
  width's plus the escalated share of the full width's (an escalated token pays for both).
  One entry per threshold. `router`: the workdir's learned router decides instead of confidence
  (rag_jax/router.py; thresholds are predicted gains in nats; `draft_fraction` None: the
  router's own width)."""
  thresholds = [float(t) for t in thresholds]
  learned = router_lib.load(workdir) if router else None
  if draft_fraction is None:
    draft_fraction = learned.fraction if learned is not None else 0.5
  if learned is not None:
    if not thresholds or not all(math.isfinite(t) for t in thresholds):
      raise ValueError(f'--thresholds must be finite gains (nats), got {thresholds}.')
  elif not thresholds or not all(0 < t <= 1 for t in thresholds):
    raise ValueError(f'--thresholds must be probabilities in (0, 1], got {thresholds}.')
  if learned is not None and learned.fraction != draft_fraction:
    raise ValueError(f'the router of {workdir} routes from the width {learned.fraction:g}; give '
                     f'--draft_fraction={learned.fraction:g}, not {draft_fraction:g}.')
  if not 0 < draft_fraction < 1:
    raise ValueError(f'--draft_fraction must be in (0, 1), got {draft_fraction}.')

  def check(act):
    if act.structure != 'nested':
      raise ValueError("--policy=adaptive escalates from a nested width; the run's structure is "
                       f'{act.structure!r}.')

  config, model, params, step, act, tokens = _load(workdir, split, overrides, check,
                                                   config_overrides=config_overrides)
  cfg = model.cfg
  adaptive_step = jax.jit(make_adaptive_step(model, act, draft_fraction, thresholds, learned))
  losses, escalated, count = split_sums(adaptive_step, params, tokens, config)
  full = flops.flops_per_token(cfg)
  narrow = flops.flops_per_token(cfg, **activation.compute_fractions(act, cfg, draft_fraction))
  entries = []
  for threshold, total, esc in zip(thresholds, losses, escalated):
    rate = float(esc / count)
    cost = narrow + rate * full
    loss = float(total / count)
    entries.append({'active_fraction': float(draft_fraction), 'relative_flops': cost / full,
                    'policy': 'adaptive', 'loss': loss,
                    'bits_per_token': loss / math.log(2), 'flops_per_token': cost,
                    'split': split, 'step': int(step), 'tokens': int(count),
                    'structure': act.structure, 'sites': act.sites, 'threshold': threshold,
                    'draft_fraction': float(draft_fraction), 'escalated': rate,
                    'router': learned is not None})
  update_eval_curve(workdir, entries)
  return entries


def curve_of(workdir: str) -> list[dict]:
  path = os.path.join(workdir, workdir_lib.EVAL_CURVE_FILE)
  return files.read_json(path) if files.exists(path) else []


def format_table(entries: list[dict], curve: list[dict] = ()) -> str:
  """One aligned table of scored entries: the policy and its width, FLOPs per token and against
  the dense model, loss, bits per token, and the loss against the full width's (a = 1, fixed,
  same split, from `entries` or the saved curve)."""
  full = {e.get('split'): e['loss'] for e in list(curve) + list(entries)
          if e['policy'] == 'fixed' and e['active_fraction'] == 1.0}
  head = entries[0]
  lines = [f"{head.get('split')} split, step {head['step']}, {head['tokens']:,} tokens scored",
           f"{'policy':<28} {'FLOPs/token':>11} {'vs dense':>8} {'loss':>8} {'bits/token':>10} "
           f"{'vs a = 1':>9}"]
  for e in entries:
    if e['policy'] == 'adaptive':
      name = (f"adaptive {e['draft_fraction']:g} @ {e['threshold']:g}"
              f"{' router' if e.get('router') else ''} (up {e['escalated']:.0%})")
    else:
      name = f"{e['policy']} {e['active_fraction']:.2f}"
    base = full.get(e.get('split'))
    delta = f"{100 * (e['loss'] / base - 1):+.2f}%" if base else ''
    lines.append(f"{name:<28} {e['flops_per_token'] / 1e6:>10.3f}M {e['relative_flops']:>8.2f} "
                 f"{e['loss']:>8.4f} {e['bits_per_token']:>10.4f} {delta:>9}")
  return '\n'.join(lines)


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.', required=True)
  flags.DEFINE_list('active_fractions', None, 'Active fractions to evaluate (default: every '
                    'width a nested RA run computes; 1 for a dense run).')
  flags.DEFINE_enum('policy', 'fixed', list(POLICIES), 'Activation policy.')
  flags.DEFINE_enum('split', 'validation', list(data_lib.SPLITS), 'Split to score.')
  flags.DEFINE_float('draft_fraction', 0.5, 'adaptive: the nested width every token runs first.')
  flags.DEFINE_list('thresholds', [str(t) for t in ADAPTIVE_THRESHOLDS],
                    'adaptive: escalate to the full width below this top-1 probability (with '
                    f'--router: above this predicted gain in nats; default {ROUTER_THRESHOLDS}).')
  flags.DEFINE_bool('router', False, 'adaptive: the workdir\'s learned router decides '
                    '(experiments/router.py --save); --draft_fraction defaults to its width.')
  flags.DEFINE_list('escalation_shares', None, 'adaptive with --router: the thresholds at which '
                    'about these shares of tokens escalate (the router\'s table), instead of '
                    '--thresholds.')
  cli.define_activation_flags(structure=True)


def main(argv):
  workdir_lib.quiet_logs()
  del argv
  f = flags.FLAGS
  try:
    fractions = (None if f.active_fractions is None
                 else [float(a) for a in f.active_fractions])
  except ValueError:
    sys.exit(f'error: --active_fractions must be numbers, got {",".join(f.active_fractions)!r}.')
  if f.policy == 'random' and f['active_fractions'].present:
    sys.exit('error: --active_fractions goes with --policy=fixed; the random policy draws its '
             'fractions (set them with --alpha, --beta, --lam).')
  if f.policy == 'adaptive' and f['active_fractions'].present:
    sys.exit('error: --active_fractions goes with --policy=fixed; the adaptive policy takes '
             '--draft_fraction and --thresholds.')
  try:
    overrides = cli.activation_overrides()
    thresholds = (f.thresholds if f['thresholds'].present or not f.router
                  else ROUTER_THRESHOLDS)
    if f.escalation_shares is not None:
      try:
        shares = [float(s) for s in f.escalation_shares]
      except ValueError:
        raise ValueError('--escalation_shares must be numbers, got '
                         f'{",".join(f.escalation_shares)!r}.') from None
      learned = router_lib.load(f.workdir) if f.router else None
      thresholds = [router_lib.request_threshold(
          learned, 0.0, s, threshold_given=f['thresholds'].present,
          share_name='--escalation_shares', threshold_name='--thresholds') for s in shares]
    draft = f.draft_fraction if f['draft_fraction'].present or not f.router else None
    entries = evaluate(f.workdir, fractions, f.policy, f.split, overrides, draft,
                       [float(t) for t in thresholds], cli.run_overrides(), f.router)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  table = format_table(entries, curve_of(f.workdir))
  print(table)
  table_path = os.path.join(f.workdir, workdir_lib.EVAL_TABLE_FILE)
  files.write_text(table_path, table + '\n')
  print(f'wrote {table_path}')
  print(f'wrote {os.path.join(f.workdir, workdir_lib.EVAL_CURVE_FILE)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
