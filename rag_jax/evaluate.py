"""Loss and bits per token of a trained run, written to `eval_curve.json`.

    python -m rag_jax.evaluate --workdir=DIR [--active_fractions=1.0] [--policy=fixed] [--split=test]

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
import optax

from rag_jax import activation
from rag_jax import cli
from rag_jax import data as data_lib
from rag_jax import files
from rag_jax import flops
from rag_jax import runs
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

# The policies a parallel pass scores (activation.POLICIES; `dense` is `fixed` at 1.0).
POLICIES = tuple(p for p in activation.POLICIES if p != 'dense')


def plan_fn(act, model_cfg, policy: str = 'fixed', fraction: float | None = None):
  """(key, batch shape) -> activation plan for an eval batch, or None for the dense model.

  `fixed`: static widths at `fraction` (units chosen by the key for random/bernoulli).
  `random`: a fresh draw at every position of every window, as masks; the loss is what
  token-by-token generation with per-token draws computes (see activation.per_position_plan).
  """
  if policy == 'fixed':
    if fraction is None or (fraction == 1.0 and act.structure == 'nested'):
      return None
    return lambda key, shape: activation.make_plan(key, act, model_cfg, fraction=fraction)
  if policy == 'random':
    return lambda key, shape: jax.vmap(
        lambda k: activation.per_position_plan(k, act, model_cfg, shape[1] - 1))(
            jax.random.split(key, shape[0]))
  raise ValueError(f'--policy must be one of {POLICIES}, got {policy!r}.')


def make_eval_step(model: gpt.GPT, plan_for=None):
  """(params, tokens_Bx(T+1), weights_B, key) -> (summed loss, number of scored tokens)."""

  def eval_step(params, tokens, weights_B, key):
    plan = None if plan_for is None else plan_for(key, tokens.shape)
    logits_BxTxV, _ = model.apply({'params': params}, tokens[:, :-1], plan=plan)
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), tokens[:, 1:])
    return (losses_BxT.sum(-1) * weights_B).sum(), weights_B.sum() * losses_BxT.shape[1]

  return eval_step


def mean_loss(eval_step, params, tokens: np.ndarray, config, batch_sharding=None,
              key: jax.Array | None = None) -> tuple[float, int]:
  """Mean next-token loss over a split (windows from data.eval_batches); returns (loss, count).
  Batch i gets the activation key fold_in(key, i)."""
  key = jax.random.key(0) if key is None else key
  total, count = 0.0, 0.0
  for i, (batch, weights) in enumerate(data_lib.eval_batches(
      tokens, config.model.block_size, config.eval_batch_size, config.eval_batches)):
    if batch_sharding is not None:
      batch, weights = data_lib.put((batch, weights), batch_sharding)
    s, n = eval_step(params, batch, weights, jax.random.fold_in(key, i))
    total, count = total + float(s), count + float(n)
  return total / count, int(count)


def update_eval_curve(workdir: str, entries: list[dict]) -> list[dict]:
  path = os.path.join(workdir, workdir_lib.EVAL_CURVE_FILE)
  key = lambda e: (e['active_fraction'], e['policy'], e.get('split'))
  old = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except json.JSONDecodeError:
      os.replace(path, path + '.damaged')  # keep it for inspection; write a fresh curve.
  new_keys = {key(e) for e in entries}
  curve = [e for e in old if key(e) not in new_keys] + entries
  curve.sort(key=lambda e: (e.get('split') or '', e['policy'], -e['active_fraction']))
  files.write_json(path, curve)
  return curve


def evaluate(workdir: str, active_fractions=(1.0,), policy: str = 'fixed',
             split: str = 'validation', overrides: dict | None = None) -> list[dict]:
  """Scores the newest checkpoint at each fixed fraction, or under the random policy.

  The activation settings are the run's `config.activation` updated by `overrides` (e.g.
  alpha/beta/lam for the random policy, or structure/sites); on a dense run, fixed fractions
  below 1 score the dense model truncated to those widths (nested prefixes by default).
  """
  if policy not in POLICIES:
    raise ValueError(f'--policy must be one of {POLICIES}, got {policy!r}.')
  if policy == 'fixed' and not len(active_fractions):
    raise ValueError('--active_fractions is empty; give the fractions to score, e.g. 1,0.5,0.25.')
  for a in active_fractions:
    if not 0 < a <= 1:
      raise ValueError(f'active fractions must be in (0, 1], got {a}.')
  config, tokenizer, model, params, step = runs.load_run(workdir)
  act = config.activation
  if overrides:
    act.update({k: v for k, v in overrides.items() if v is not None})
  activation.validate(act, config.model)
  if policy == 'random':
    activation.check_draws(act, '--policy=random would score the dense model')
  workdir_lib.check_writable(workdir)  # before the work, so that no result is lost
  dataset = data_lib.load(config, tokenizer)
  if split not in dataset.splits:
    raise ValueError(f'--split must be one of {tuple(dataset.splits)}, got {split!r}.')
  cfg = model.cfg
  eval_key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], 1)
  entries = []
  for fraction in (active_fractions if policy == 'fixed' else [None]):
    eval_step = jax.jit(make_eval_step(model, plan_fn(act, cfg, policy, fraction)))
    loss, count = mean_loss(eval_step, params, dataset.splits[split], config, key=eval_key)
    compute = activation.compute_fractions(act, cfg, fraction)
    sites = activation.parse_sites(act.sites)
    realized = [compute[s] for s in sites] or [1.0]
    entry = {'active_fraction': float(fraction) if fraction is not None else
             float(np.mean(realized)), 'policy': policy, 'loss': loss,
             'bits_per_token': loss / math.log(2),
             'flops_per_token': flops.flops_per_token(cfg, **compute), 'split': split,
             'step': int(step), 'tokens': count, 'structure': act.structure,
             'sites': act.sites}
    if policy == 'random':
      entry.update(alpha=act.alpha, beta=act.beta, lam=act.lam)
    entries.append(entry)
  update_eval_curve(workdir, entries)
  return entries


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.', required=True)
  flags.DEFINE_list('active_fractions', ['1.0'], 'Active fractions to evaluate.')
  flags.DEFINE_enum('policy', 'fixed', list(POLICIES), 'Activation policy.')
  flags.DEFINE_enum('split', 'validation', list(data_lib.SPLITS), 'Split to score.')
  cli.define_activation_flags(structure=True)


def main(argv):
  workdir_lib.quiet_logs()
  del argv
  f = flags.FLAGS
  try:
    fractions = [float(a) for a in f.active_fractions]
  except ValueError:
    sys.exit(f'error: --active_fractions must be numbers, got {",".join(f.active_fractions)!r}.')
  if f.policy == 'random' and f['active_fractions'].present:
    sys.exit('error: --active_fractions goes with --policy=fixed; the random policy draws its '
             'fractions (set them with --alpha, --beta, --lam).')
  try:
    overrides = cli.activation_overrides()
    entries = evaluate(f.workdir, fractions, f.policy, f.split, overrides)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  for e in entries:
    print(f"{e['split']} step {e['step']}: active_fraction={e['active_fraction']:.2f} "
          f"policy={e['policy']} loss={e['loss']:.4f} bits/token={e['bits_per_token']:.4f} "
          f"flops/token={e['flops_per_token']:.4g}")
  print(f'wrote {os.path.join(f.workdir, workdir_lib.EVAL_CURVE_FILE)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
