"""Self-speculative decoding against plain dense decoding, batch 1, on a trained nested RA run.

    .venv/bin/python experiments/bench_speculative.py --workdir=runs/ra \
        --out=results/bench_speculative_cpu.json

For each prompt (windows of the validation split), every program generates the rest of the
context (block_size - prompt - max draft tokens) once per round, programs interleaved; the
table gives the median ms per generated token over prompts and rounds, the fraction of draft
tokens accepted, tokens committed per full-width pass, and the speed-up over dense decoding
measured in the same run. Greedy programs are checked to produce the dense greedy text; the
sampled ones (temperature 0.8) give the acceptance of sampling.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import ml_collections
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_FRACTIONS = flags.DEFINE_list('draft_fractions', ['0.5', '0.25'], 'Draft widths.')
_KS = flags.DEFINE_list('draft_tokens', ['1', '2', '3', '4', '6'], 'Draft lengths k.')
_CACHES = flags.DEFINE_list('draft_caches', ['shared', 'separate'], 'Draft caches.')
_PROMPTS = flags.DEFINE_integer('prompts', 8, 'Prompts (validation windows).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 8, 'Tokens per prompt.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds.')
_PROMPTS_FILE = flags.DEFINE_string(
    'prompts_file', None, 'A .npy of prompts [prompts, prompt_len]: read when it exists (no data '
    'set needed, e.g. on a machine without TensorFlow), else made from the validation split and '
    'written there.')


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  run = runs.load_run(_WORKDIR.value)
  config, tokenizer, model, params = run.config, run.tokenizer, run.model, run.params
  T, k_max = model.cfg.block_size, max(map(int, _KS.value))
  num_tokens = T - _PROMPT_LEN.value - k_max
  prompts_file = _PROMPTS_FILE.value
  if prompts_file and files.exists(prompts_file):
    windows = np.load(prompts_file).astype(np.int32)
    if windows.ndim != 2 or windows.shape[1] != _PROMPT_LEN.value:
      raise SystemExit(f'error: {prompts_file} holds prompts of shape {windows.shape}; expected '
                       f'[prompts, {_PROMPT_LEN.value}] (--prompt_len)')
  else:
    windows = bench_common.validation_windows(config, tokenizer, _PROMPT_LEN.value,
                                              _PROMPTS.value)
    if prompts_file:
      np.save(prompts_file, windows)
  prompts = [w[None] for w in windows]
  act = ml_collections.FrozenConfigDict(config.activation)
  key = jax.random.key(0)
  lengths, ids = np.array([_PROMPT_LEN.value], np.int32), np.array([0], np.int32)
  common = dict(num_tokens=num_tokens, top_k=0, top_p=1.0, end_token=None)

  programs = {}  # name -> (compiled, speculative?, greedy?)

  def build(name, fn, **kw):
    t0 = time.perf_counter()
    programs[name] = (fn.lower(params, model, prompts[0], key, lengths, ids, **common,
                               **kw).compile(), fn is sample_lib.speculative_generate,
                      kw['greedy'], time.perf_counter() - t0)

  build('dense', sample_lib.generate, greedy=True, temperature=1.0, policy='dense')
  for a in map(float, _FRACTIONS.value):
    build(f'fixed_{a}', sample_lib.generate, greedy=True, temperature=1.0, policy='fixed',
          active_fraction=a, act=act)
    for cache in _CACHES.value:
      for k in map(int, _KS.value):
        for greedy in (True, False):
          build(f'spec_{a}_{cache}_k{k}' + ('' if greedy else '_sampled'),
                sample_lib.speculative_generate, greedy=greedy,
                temperature=1.0 if greedy else 0.8, act=act, draft_fraction=a, draft_tokens=k,
                draft_cache=cache)
  print(f'{len(programs)} programs compiled', file=sys.stderr, flush=True)

  ms = {name: [] for name in programs}
  stats = {name: np.zeros(3, np.int64) for name in programs}
  dense_text = {}
  mismatches = {name: 0 for name in programs}
  for _ in range(_ROUNDS.value):
    for i, prompt in enumerate(prompts):
      for name, (compiled, speculative, greedy, _) in programs.items():
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, prompt, key, lengths, ids))
        ms[name].append(1e3 * (time.perf_counter() - t0) / num_tokens)
        tokens = np.asarray(out[0])
        if speculative:
          stats[name] += np.asarray(out[1])[0]
        if name == 'dense':
          dense_text[i] = tokens
        elif greedy and name.startswith('spec'):
          mismatches[name] += int(not np.array_equal(tokens, dense_text[i]))

  dense_ms = float(np.median(ms['dense']))
  table = {}
  for name, (_, speculative, greedy, compile_s) in programs.items():
    row = {'ms_per_token': bench_common.stats(ms[name]), 'compile_s': compile_s,
           'speedup_vs_dense': dense_ms / float(np.median(ms[name]))}
    if speculative:
      iterations, proposed, accepted = (int(x) for x in stats[name])
      row.update(acceptance=accepted / proposed,
                 tokens_per_full_pass=_ROUNDS.value * len(prompts) * num_tokens / iterations,
                 greedy=greedy, greedy_text_differs_from_dense=mismatches[name] if greedy else None)
    table[name] = row
  result = {'workdir': os.path.abspath(_WORKDIR.value), 'step': int(run.step),
            'model': dict(config.model), 'activation': dict(config.activation),
            'prompts': len(prompts), 'prompt_len': _PROMPT_LEN.value, 'num_tokens': num_tokens,
            'rounds': _ROUNDS.value, 'batch': 1, 'programs': table,
            **bench_common.environment(), 'load_average_1_5_15min_at_end': os.getloadavg()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  for name, row in table.items():
    extra = (f"  accepted {row['acceptance']:.2f}  tokens/pass {row['tokens_per_full_pass']:.2f}"
             if 'acceptance' in row else '')
    print(f"{name:32s} {row['ms_per_token']['median']:.3f} ms/token  "
          f"{row['speedup_vs_dense']:.2f}x{extra}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
