"""Is random generation stable? Sampled text under every policy, scored by the full model.

    .venv/bin/python experiments/generation_stability.py --workdir=runs/ra \
        --out=results/generation_stability_cpu.json

The method's own caveat is that drawing a random part of the network at every generated token may
make the text drift. Teacher-forced loss cannot show that (every position sees true text), so
this scores what each policy generates. For `--samples` prompts (windows of `--prompt_len`
tokens evenly spread over the validation split) every policy samples one continuation per
prompt (temperature `--temperature`, or `--greedy`, where a model stuck in a loop shows most;
the same keys for every policy), and each continuation is scored by

* the full (dense) model's negative log-likelihood per token (nats), teacher-forced over windows
  of the context T with stride T/2, so every token is scored with at least T/2 tokens before it
  (the sampler's own context rule); the mean over rows with its standard error;
* repetition: distinct-n, the share of the row's n-grams (of tokens) that are distinct, for
  several n (a model stuck in a loop has low distinct-n); the mean over rows;
* the realised active fraction of the passes behind its tokens (`adaptive` counts both passes of
  an escalated token).

The validation text that follows each prompt is scored the same way (the `data` row). Two
lengths: `--num_tokens` (several contexts long, so drift across cache rebuilds shows) for every
policy but `speculative`, and the context's length (T - prompt - k) for all of them, because
speculative decoding keeps its text within one context. Speculative sampling is the full model's
distribution, so its row should match `dense` within the noise.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib

def _define_flags():
  flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
  flags.DEFINE_string('out', None, 'JSON output.', required=True)
  flags.DEFINE_integer('samples', 256, 'Prompts, one continuation each per policy.')
  flags.DEFINE_integer('prompt_len', 8, 'Tokens per prompt.')
  flags.DEFINE_integer('num_tokens', 256, 'Tokens per continuation (long run).')
  flags.DEFINE_integer('batch', 64, 'Rows generated together.')
  flags.DEFINE_float('temperature', 0.8, 'Sampling temperature (the CLI default).')
  flags.DEFINE_bool('greedy', False, 'Greedy decoding instead (where loops show most).')
  flags.DEFINE_list('fractions', ['0.75', '0.5', '0.25'], '`fixed` widths.')
  flags.DEFINE_float('draft_fraction', 0.5, '`adaptive` and `speculative` narrow width.')
  flags.DEFINE_list('thresholds', ['0.3', '0.6', '0.9'], '`adaptive` thresholds.')
  flags.DEFINE_integer('draft_tokens', 4, '`speculative` k.')
  flags.DEFINE_list('ngrams', ['4', '8', '16'], 'n of distinct-n.')


def distinct(row: np.ndarray, n: int) -> float:
  """The share of distinct n-grams among the row's n-grams."""
  grams = np.lib.stride_tricks.sliding_window_view(row, n)
  return len({g.tobytes() for g in grams}) / len(grams)


def make_scorer(model, params, T: int):
  """(tokens_RxN, first) -> per-row mean NLL of tokens[:, first:] under the full model, over
  windows of T with stride T/2 (each token after the first window sees >= T/2 tokens)."""
  @jax.jit
  def window_nll(tokens_RxT):
    logits, _ = model.apply({'params': params}, tokens_RxT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           tokens_RxT[:, 1:])

  def score(tokens_RxN: np.ndarray, first: int) -> np.ndarray:
    R, N = tokens_RxN.shape
    nll_RxN = np.full((R, N), np.nan)  # nll_RxN[:, t]: the NLL of token t
    h, s, done = max(T // 2, 1), 0, 0  # `done`: targets up to this index are scored
    while done < N - 1:
      s = min(s, max(N - T - 1, 0))
      window = tokens_RxN[:, s:s + T + 1]  # T inputs, T targets s+1..s+T
      nll = np.asarray(window_nll(jnp.asarray(window)))
      targets = np.arange(s + 1, s + window.shape[1])
      new = targets > done
      nll_RxN[:, targets[new]] = nll[:, new]
      done, s = int(targets[-1]), s + h
    return np.nanmean(nll_RxN[:, first:], axis=1)

  return score


def summarize(name, tokens_RxN, P, fractions, score, ngrams, seconds=None, **extra):
  nll_R = score(tokens_RxN, P)
  cont = tokens_RxN[:, P:]
  row = {'policy': name, 'rows': int(len(cont)), 'tokens': int(cont.shape[1]),
         'nll': float(nll_R.mean()), 'nll_se': float(nll_R.std(ddof=1) / np.sqrt(len(nll_R))),
         'active_fraction': None if fractions is None else float(np.mean(fractions)), **extra}
  for n in ngrams:
    d_R = np.asarray([distinct(r, n) for r in cont])
    row[f'distinct_{n}'] = float(d_R.mean())
    row[f'distinct_{n}_se'] = float(d_R.std(ddof=1) / np.sqrt(len(d_R)))
  if seconds is not None:
    row['ms_per_token_batch'] = 1e3 * seconds / cont.shape[1]
  return row


def main(argv):
  del argv
  f = flags.FLAGS
  workdir_lib.quiet_logs()
  run = runs.load_run(f.workdir)
  config, tokenizer, model, params = run.config, run.tokenizer, run.model, run.params
  act = ml_collections.FrozenConfigDict(config.activation)
  if not act.enabled or act.structure != 'nested':
    raise SystemExit('error: --workdir must be a nested RA run (its widths are the policies).')
  T, P, k = model.cfg.block_size, f.prompt_len, f.draft_tokens
  short = T - P - k
  long_ = f.num_tokens
  ngrams = [int(n) for n in f.ngrams]
  if short < max(ngrams) or P < 1:
    raise SystemExit(f'error: the context {T} leaves {short} tokens after a prompt of {P} and '
                     f'{k} draft tokens: too few for distinct-{max(ngrams)}.')
  R, B = f.samples, f.batch
  if R % B:
    raise SystemExit(f'error: --samples ({R}) must be a multiple of --batch ({B}).')
  data_RxN = bench_common.validation_windows(config, tokenizer, P + long_, R)
  key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], 0)
  lengths_B = np.full((B,), P, np.int32)
  greedy = f.greedy
  common = dict(temperature=1.0 if greedy else f.temperature, top_k=0, top_p=1.0,
                greedy=greedy, end_token=None)

  policies = [('dense', sample_lib.generate, dict(policy='dense'))]
  policies += [(f'fixed {a}', sample_lib.generate, dict(policy='fixed', active_fraction=float(a),
                                                       act=act)) for a in f.fractions]
  policies.append(('random', sample_lib.generate, dict(policy='random', act=act)))
  policies += [(f'adaptive {f.draft_fraction} @ {p}', sample_lib.generate,
                dict(policy='adaptive', active_fraction=f.draft_fraction, threshold=float(p),
                     act=act)) for p in f.thresholds]
  speculative = (f'speculative {f.draft_fraction} k={k}', sample_lib.speculative_generate,
                 dict(act=act, draft_fraction=f.draft_fraction, draft_tokens=k,
                      draft_cache='shared'))
  score = make_scorer(model, params, T)
  tables = {}
  for length, programs in ((long_, policies), (short, policies + [speculative])):
    rows = [summarize('data', data_RxN[:, :P + length], P, None, score, ngrams)]
    for name, fn, kw in programs:
      compiled = fn.lower(params, model, data_RxN[:B, :P], key, lengths_B, np.arange(B),
                          num_tokens=length, **common, **kw).compile()
      outs, fractions, seconds, spec = [], [], 0.0, np.zeros(3, np.int64)
      for c in range(R // B):
        t0 = time.perf_counter()
        out = jax.device_get(compiled(params, data_RxN[c * B:(c + 1) * B, :P], key, lengths_B,
                                      np.arange(c * B, (c + 1) * B, dtype=np.int32)))
        seconds += time.perf_counter() - t0
        outs.append(np.asarray(out[0]))
        if fn is sample_lib.speculative_generate:
          spec += np.asarray(out[1]).sum(0)
          fractions.append(np.ones((B, length), np.float32))
        else:
          fractions.append(np.asarray(out[1]))
      extra = {} if not spec.any() else {'acceptance': float(spec[2] / spec[1]),
                                         'tokens_per_full_pass': float(R * length / spec[0])}
      rows.append(summarize(name, np.concatenate(outs), P, np.concatenate(fractions), score,
                            ngrams, seconds / (R // B), **extra))
      print(f'{length:4d} {name:28s} nll {rows[-1]["nll"]:.4f} ± {rows[-1]["nll_se"]:.4f}  ' +
            '  '.join(f'd{n} {rows[-1][f"distinct_{n}"]:.3f}' for n in ngrams) +
            f'  a {rows[-1]["active_fraction"]:.3f}', file=sys.stderr, flush=True)
    tables[str(length)] = rows

  result = {'workdir': os.path.abspath(f.workdir), 'step': int(run.step),
            'model': dict(config.model), 'activation': dict(config.activation),
            'samples': R, 'prompt_len': P, 'batch': B,
            'decoding': 'greedy' if greedy else f'temperature {f.temperature}',
            'lengths': {'long': long_, 'short': short}, 'tables': tables,
            **bench_common.environment()}
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  files.write_json(f.out, result)
  for length, rows in tables.items():
    print(f"\n{length} tokens after a prompt of {P}, {R} rows, {result['decoding']}")
    print('| policy | active fraction | NLL (full model) | ' +
          ' | '.join(f'distinct-{n}' for n in ngrams) + ' |')
    print('|---|---|---|' + '---|' * len(ngrams))
    for r in rows:
      a = '' if r['active_fraction'] is None else f"{r['active_fraction']:.2f}"
      print(f"| {r['policy']} | {a} | {r['nll']:.3f} ± {r['nll_se']:.3f} | " +
            ' | '.join(f"{r[f'distinct_{n}']:.3f}" for n in ngrams) + ' |')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags_with_output)
