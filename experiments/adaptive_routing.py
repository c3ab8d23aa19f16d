"""Why the `adaptive` policy does not beat the fixed widths: what confidence picks, against an
oracle, teacher-forced on validation windows of a nested RA run.

    .venv/bin/python experiments/adaptive_routing.py --workdir=RUN --draft_fraction=0.25 \
        --out=results/adaptive_routing.json [--thresholds=0.2,0.3,0.5] [--batches=16]

The windows are evaluate's (`data.eval_batches`: non-overlapping context-length windows from the
split's start, `--batches` of `--batch`). Per position: the loss at the nested width
`--draft_fraction` (narrow), the loss at the full width (full), and the narrow width's top-1
probability (the `adaptive` policy's confidence, `sampling.confidence`). For each threshold:
  * `mixed_context`: `evaluate --policy=adaptive`'s score, by its own step
    (`evaluate.make_adaptive_step`: escalated positions at the full width, the others narrow,
    each position's keys and values those of its own width);
  * `full_context`: the escalated positions scored by the pure full pass (as if every earlier
    position had run at the full width): what a mixed-width context costs is the difference;
and for the same share of escalated positions, the `gain`s over the pure narrow loss (nats per
token) of two choices of which positions escalate: the least confident (the policy), and an
oracle that takes the largest narrow - full loss differences (the best any router could do at
that share). The narrow pass runs twice per batch (here and inside evaluate's step): the price
of scoring the policy with the code that defines it.
"""
from __future__ import annotations

import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rag_jax import cli
from rag_jax import activation
from rag_jax.data import pipeline as data_lib
from rag_jax import evaluate
from rag_jax import files
from rag_jax import runs
from rag_jax import sampling
from rag_jax import workdir as workdir_lib


def _define_flags():  # at run time only: tests import this module beside other scripts' flags
  flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
  flags.DEFINE_float('draft_fraction', 0.25, 'The narrow width every token runs first.')
  flags.DEFINE_list('thresholds', ['0.2', '0.3', '0.5'], 'Top-1 thresholds.')
  flags.DEFINE_integer('batches', 16, 'Batches of validation windows (-1: the whole split).')
  flags.DEFINE_integer('batch', 32, 'Windows per batch.')
  flags.DEFINE_string('out', None, 'JSON output.', required=True)


def routing_gains(narrow_minus_full: np.ndarray, confidence: np.ndarray, share: float) -> dict:
  """Mean loss gained over the narrow width (nats per position) when a `share` of positions
  runs at the full width instead (scored with a full-width context): the least confident ones,
  or the oracle's (largest narrow - full differences)."""
  d, c = np.ravel(narrow_minus_full).astype(np.float64), np.ravel(confidence)
  n = int(round(share * d.size))
  return {'least_confident': float(d[np.argsort(c, kind='stable')[:n]].sum() / d.size),
          'oracle': float(np.sort(d)[::-1][:n].sum() / d.size)}


def main(argv):
  del argv
  f = flags.FLAGS
  if not 0 < f.draft_fraction < 1:
    raise SystemExit(f'error: --draft_fraction must be in (0, 1), got {f.draft_fraction}')
  thresholds = [float(t) for t in f.thresholds]
  if not thresholds or not all(0 < t <= 1 for t in thresholds):
    raise SystemExit(f'error: --thresholds must be probabilities in (0, 1], got {thresholds}')
  workdir_lib.quiet_logs()
  run = runs.load_run(f.workdir)
  model, params, config = run.model, run.params, run.config
  act = config.activation
  if not act.enabled or act.structure != 'nested':
    raise SystemExit('error: --workdir must be a nested random-activation run')
  narrow = activation.make_plan(jax.random.key(0), act, model.cfg, fraction=f.draft_fraction)
  adaptive_step = jax.jit(evaluate.make_adaptive_step(model, act, f.draft_fraction, thresholds))

  def losses(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)

  @jax.jit
  def score(tokens):  # per position: narrow loss, full loss, the narrow width's confidence
    x, y = tokens[:, :-1], tokens[:, 1:]
    narrow_logits = model.apply({'params': params}, x, plan=narrow)[0]
    loss_full = losses(model.apply({'params': params}, x)[0], y)
    return losses(narrow_logits, y), loss_full, sampling.confidence(narrow_logits)

  val = data_lib.load(config, run.tokenizer, ('validation',)).splits['validation']
  config.eval_batch_size, config.eval_batches = f.batch, f.batches  # evaluate's windows, as many
  mixed, escalated, count = evaluate.split_sums(adaptive_step, params, val, config)
  parts = []
  for tokens, weights in data_lib.eval_batches(val, model.cfg.block_size, f.batch, f.batches):
    keep = weights > 0  # the last batch is padded with zero-weight windows
    parts.append([np.asarray(a)[keep] for a in score(tokens)])
  loss_narrow, loss_full, confidence = (np.concatenate([p[j] for p in parts]) for j in range(3))
  rows = []
  for t, mixed_sum, escalated_sum in zip(thresholds, mixed, escalated):
    escalate = confidence < t
    share = float(escalate.mean())
    rows.append({'threshold': t, 'escalated': float(escalated_sum / count),
                 'mixed_context_loss': float(mixed_sum / count),
                 'full_context_loss': float(np.where(escalate, loss_full, loss_narrow).mean()),
                 'gain_over_narrow': routing_gains(loss_narrow - loss_full, confidence, share)})
  result = {'workdir': f.workdir, 'step': int(run.step), 'draft_fraction': f.draft_fraction,
            'positions': int(loss_narrow.size), 'narrow_loss': float(loss_narrow.mean()),
            'full_loss': float(loss_full.mean()), 'thresholds': rows}
  files.write_json(f.out, result)
  print(f"a = {f.draft_fraction}: narrow {result['narrow_loss']:.4f}, full "
        f"{result['full_loss']:.4f} over {result['positions']} positions", file=sys.stderr)
  for r in rows:
    g = r['gain_over_narrow']
    print(f"threshold {r['threshold']}: escalated {r['escalated']:.3f}, loss mixed context "
          f"{r['mixed_context_loss']:.4f} / full context {r['full_context_loss']:.4f}; gain: "
          f"least confident {g['least_confident']:.4f}, oracle {g['oracle']:.4f}", file=sys.stderr)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags_with_output)
