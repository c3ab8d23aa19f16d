"""A learned width router against confidence, a random mix and an oracle, teacher-forced.

    .venv/bin/python experiments/router.py --workdir=RUN --draft_fraction=0.25 \
        --out=results/router/RUN_a0.25.json [--train_batches=256] [--batches=-1] [--save]

A post-hoc router (rag_jax/router.py: a two-layer MLP on the narrow pass's final hidden state,
top-1 log-probability and entropy) is fitted, with the RA model frozen, to the per-position gain
`loss_narrow - loss_full` on `--train_batches` batches of random training windows; then, on
evaluate's validation windows, for each escalation share s (10-50%) the loss when the share s of
positions runs at the full width, chosen by
  * the router (largest predicted gain): `loss_router`;
  * confidence (lowest narrow top-1 probability, the `adaptive` policy's rule): `loss_confidence`;
  * chance (`loss_random_mix`: the linear interpolation of the two fixed widths' losses);
  * the expected-gain oracle (largest KL(p_full || p_narrow), what the context alone can tell:
    the bound of a causal router that cannot see the next token): `loss_expected_oracle`;
  * the oracle (largest realised gain, which needs the next token): `loss_oracle`;
with `flops_ratio`, the FLOPs per token relative to dense (the narrow pass for every token plus
the full pass for the share s: an escalated token pays both), and the router's precision at the
share (how many of its choices are among the oracle's). These escalated positions are scored
by the pure full pass (a full-width context). `mixed_context` scores the same choices as
decoding runs them (`evaluate --policy=adaptive`'s masks: an escalated token reads the narrow
keys and values of the tokens before it that did not escalate), with `loss_random` a random
choice at each share. `--save` writes the router into the workdir (router.ROUTER_FILE), with the
thresholds at which each share of the validation positions escalates (`--escalation_share`).
"""
from __future__ import annotations

import sys

from absl import app, flags
import jax
import numpy as np

from rag_jax import activation
from rag_jax import cli
from rag_jax.data import pipeline as data_lib
from rag_jax import files
from rag_jax import flops
from rag_jax import losses
from rag_jax import plan as plan_lib
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib

SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)


def _define_flags():  # at run time only: tests import this module beside other scripts' flags
  flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
  flags.DEFINE_float('draft_fraction', 0.25, 'The narrow width every token runs first.')
  flags.DEFINE_integer('train_batches', 256, 'Batches of random training windows to fit on.')
  flags.DEFINE_integer('batches', -1, 'Batches of validation windows (-1: the whole split).')
  flags.DEFINE_integer('batch', 32, 'Windows per batch.')
  flags.DEFINE_integer('steps', 2000, 'Router training steps.')
  flags.DEFINE_integer('hidden', 128, 'Router hidden units.')
  flags.DEFINE_enum('target', 'expected', ['expected', 'realised'], 'What the router learns: '
                    'the expected gain KL(full || narrow), or the realised loss difference.')
  flags.DEFINE_bool('save', False, 'Write the router into the workdir.')
  flags.DEFINE_integer('timing_tokens', 0, 'Also time decoding (tokens per sample; 0: no).')
  flags.DEFINE_string('out', None, 'JSON output.', required=True)


def compare(loss_narrow, loss_full, predicted, confidence, expected, shares=SHARES,
            seed: int = 0) -> list:
  """Per share: the mean loss of each choice of escalated positions (full-context scoring) and
  the router's precision against the oracle."""
  gain = (loss_narrow - loss_full).astype(np.float64)
  base = loss_narrow.astype(np.float64).mean()
  chance = np.random.default_rng(seed).random(gain.size)
  rows = []
  for s in shares:
    pick = {name: router_lib.escalate(scores, s) for name, scores in (
        ('router', predicted), ('confidence', -confidence), ('random', chance),
        ('expected_oracle', expected), ('oracle', gain))}
    row = {'share': s, **{f'loss_{k}': float(base - gain[m].sum() / gain.size)
                          for k, m in pick.items()}}
    row['loss_random_mix'] = float(base - s * gain.mean())  # the expectation of `random`
    row['precision_router'] = float((pick['router'] & pick['oracle']).sum()
                                    / max(1, pick['oracle'].sum()))
    row['precision_confidence'] = float((pick['confidence'] & pick['oracle']).sum()
                                        / max(1, pick['oracle'].sum()))
    rows.append(row)
  return rows


def mixed_context(model, params, act, fraction, batches, choices: dict, shares) -> dict:
  """{name: [loss per share]} scored as decoding runs them: each position at its chosen width,
  its keys and values those of that width, so an escalated token reads the narrow keys and
  values of the positions before it that did not escalate (evaluate --policy=adaptive's
  second pass). `choices`: {name: per-position scores over the concatenated `batches`
  (higher: escalate)}; each share escalates the positions above that score's quantile."""
  narrow = plan_lib.as_masks(activation.make_plan(jax.random.key(0), act, model.cfg,
                                                  fraction=fraction))

  @jax.jit
  def score(tokens, escalate_BxT):
    logits, _ = model.apply({'params': params}, tokens[:, :-1],
                            plan=plan_lib.escalate(narrow, escalate_BxT))
    return losses.token_losses(logits, tokens[:, 1:])

  cut = {name: [np.quantile(s, 1 - share) for share in shares] for name, s in choices.items()}
  sums, count, start = {name: np.zeros(len(shares)) for name in choices}, 0, 0
  for tokens, keep in batches:
    B, T = tokens.shape[0], tokens.shape[1] - 1
    n = int(np.sum(keep)) * T
    for name, s in choices.items():
      rows = np.zeros((B, T), np.float32) - np.inf  # padded rows: never escalated, not counted
      rows[keep] = s[start:start + n].reshape(-1, T)
      for i, c in enumerate(cut[name]):
        sums[name][i] += float(np.asarray(score(tokens, rows > c))[keep].sum())
    start, count = start + n, count + n
  return {name: (v / count).tolist() for name, v in sums.items()}


def timing(run, fitted, fraction: float, tokens: int, repeats: int = 3) -> dict:
  """Median ms per generated token (compilation excluded) at batch 1 and 8 of: the narrow and
  the full fixed widths, adaptive by confidence and by the router (thresholds at which neither
  escalates, so both cost a narrow pass and the difference is the router's), and the router at
  a threshold that escalates some tokens."""
  prompt = run.tokenizer.decode(np.asarray(data_lib.load(
      run.config, run.tokenizer, ('validation',)).splits['validation'][:16]))
  policies_ = {
      'fixed_narrow': dict(policy='fixed', active_fraction=fraction),
      'fixed_full': dict(policy='dense'),
      'confidence_never': dict(policy='adaptive', draft_fraction=fraction, threshold=0.0),
      'router_never': dict(policy='adaptive', draft_fraction=fraction, threshold=1e9,
                           router=fitted),
      'router_0.1': dict(policy='adaptive', draft_fraction=fraction, threshold=0.1,
                         router=fitted)}
  out = {}
  for batch in (1, 8):
    for name, kw in policies_.items():
      ms = []
      for seed in range(repeats):
        s = sample_lib.sample(run.params, run.config, prompt, tokenizer=run.tokenizer,
                              num_tokens=tokens, seed=seed, batch=batch, greedy=True, **kw)
        ms.append(1e3 * s.seconds / tokens)  # per decode step (all rows at once)
      out[f'{name}_batch{batch}'] = {'ms_per_step': float(np.median(ms)), 'all': ms}
  for batch in (1, 8):
    out[f'router_cost_batch{batch}'] = (out[f'router_never_batch{batch}']['ms_per_step']
                                        / out[f'confidence_never_batch{batch}']['ms_per_step'] - 1)
  return out


def _collect(score, batches):
  parts = []
  for tokens, keep in batches:
    out = jax.device_get(score(tokens))
    parts.append([np.asarray(a)[keep].reshape(-1, *np.shape(a)[2:]) for a in out])
  return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def main(argv):
  del argv
  f = flags.FLAGS
  if not 0 < f.draft_fraction < 1:
    sys.exit(f'error: --draft_fraction must be in (0, 1), got {f.draft_fraction}')
  workdir_lib.quiet_logs()
  try:
    run = runs.load_run(f.workdir)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  config, act, cfg = run.config, run.config.activation, run.model.cfg
  if not act.enabled or act.structure != 'nested':
    sys.exit('error: --workdir must be a nested random-activation run')
  score = router_lib.scorer(run.model, run.params, act, f.draft_fraction)
  splits = data_lib.load(config, run.tokenizer, ('train', 'validation')).splits
  T = cfg.block_size
  train = ((data_lib.train_batch(splits['train'], f.batch, T, 1234, i), slice(None))
           for i in range(f.train_batches))
  feats, narrow, full, kl = _collect(score, train)
  target = kl if f.target == 'expected' else narrow - full
  router, curve = router_lib.fit(feats, target, hidden=f.hidden, steps=f.steps,
                                 batch=min(4096, len(feats)))
  val = ((tokens, weights > 0) for tokens, weights in
         data_lib.eval_batches(splits['validation'], T, f.batch, f.batches))
  v_feats, v_narrow, v_full, v_kl = _collect(score, val)
  predicted = np.asarray(jax.device_get(router_lib.predict(router, v_feats)))
  confidence = np.exp(v_feats[:, -2])  # the top-1 log-probability feature
  narrow_flops = policies.Fixed(act, f.draft_fraction).relative_flops(cfg)
  rows = compare(v_narrow, v_full, predicted, confidence, v_kl)
  val = ((tokens, weights > 0) for tokens, weights in
         data_lib.eval_batches(splits['validation'], T, f.batch, f.batches))
  chance = np.random.default_rng(0).random(v_narrow.size)
  mixed = mixed_context(run.model, run.params, act, f.draft_fraction, val, {
      'router': predicted, 'confidence': -confidence, 'random': chance,
      'expected_oracle': v_kl, 'oracle': v_narrow - v_full}, SHARES)
  for i, row in enumerate(rows):
    row['mixed_context'] = {f'loss_{name}': v[i] for name, v in mixed.items()}
  for row in rows:
    row['flops_ratio'] = narrow_flops + row['share']
    for name, bound in (('gain_captured', 'loss_oracle'),
                        ('gain_captured_causal', 'loss_expected_oracle')):
      row[name] = ((row['loss_random_mix'] - row['loss_router'])
                   / max(1e-12, row['loss_random_mix'] - row[bound]))
  gain = v_narrow - v_full
  result = {
      'workdir': f.workdir, 'step': int(run.step), 'draft_fraction': f.draft_fraction,
      'train_positions': int(len(feats)), 'positions': int(v_narrow.size),
      'loss_narrow': float(v_narrow.mean()), 'loss_full': float(v_full.mean()),
      'narrow_flops_ratio': narrow_flops, 'router_fit': curve,
      'router_corr': float(np.corrcoef(predicted, gain)[0, 1]),
      'confidence_corr': float(np.corrcoef(-confidence, gain)[0, 1]),
      'router_corr_expected': float(np.corrcoef(predicted, v_kl)[0, 1]),
      'target': f.target,
      'router_parameters': int(sum(np.size(v) for k, v in router.items()
                                   if k not in ('mean', 'std'))),
      'router_flops_per_token': 2 * int(router['w1'].size + router['w2'].size),
      'model_flops_per_token': float(flops.flops_per_token(cfg)),
      'shares': rows, **{'command': ' '.join(sys.argv)}}
  if f.timing_tokens:
    result['timing'] = timing(run, router_lib.Router(router, f.draft_fraction), f.draft_fraction,
                              f.timing_tokens)
  files.write_json(f.out, result)
  if f.save:
    path = router_lib.save(f.workdir, router, f.draft_fraction,
                           router_lib.share_thresholds(predicted))
    print(f'wrote {path}', file=sys.stderr)
  print(f"a = {f.draft_fraction}: narrow {result['loss_narrow']:.4f}, full "
        f"{result['loss_full']:.4f} over {result['positions']} positions; correlation with the "
        f"gain: router {result['router_corr']:.3f}, confidence {result['confidence_corr']:.3f}")
  print(f"{'share':>5} {'FLOPs':>6} {'router':>8} {'confid.':>8} {'random':>8} {'E-oracle':>8} "
        f"{'oracle':>8} {'of E-or.':>8} {'of or.':>6} {'prec.':>6}")
  for r in rows:
    print(f"{r['share']:5.1f} {r['flops_ratio']:6.3f} {r['loss_router']:8.4f} "
          f"{r['loss_confidence']:8.4f} {r['loss_random_mix']:8.4f} "
          f"{r['loss_expected_oracle']:8.4f} {r['loss_oracle']:8.4f} "
          f"{r['gain_captured_causal']:8.2f} {r['gain_captured']:6.2f} "
          f"{r['precision_router']:6.2f}")
  print('mixed context (as decoding runs them):')
  print(f"{'share':>5} {'router':>8} {'confid.':>8} {'random':>8} {'E-oracle':>8} {'oracle':>8}")
  for r in rows:
    m = r['mixed_context']
    print(f"{r['share']:5.1f} {m['loss_router']:8.4f} {m['loss_confidence']:8.4f} "
          f"{m['loss_random']:8.4f} {m['loss_expected_oracle']:8.4f} {m['loss_oracle']:8.4f}")
  for name, row in result.get('timing', {}).items():
    print(f'{name}: ' + (f"{row['ms_per_step']:.3f} ms per step" if isinstance(row, dict)
                         else f'{100 * row:+.1f}%'))
  print(f'wrote {f.out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags_with_output)
