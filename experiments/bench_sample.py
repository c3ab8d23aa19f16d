"""Decode speed of the compiled sampler, and of re-running the whole context for every token.

    python experiments/bench_sample.py --out=results/bench_sample_cpu.json \
        [--config=configs/ra_shakespeare_char.py:gpu] [--batches=1,16] [--fractions=0.75,0.5,0.25]
        [--num_tokens=256] [--repeats=5] [--baseline_tokens=32] [--baseline_batches=1]

Model: the config's size (`:gpu`: 6 layers, 6 heads, 384 dims, context T = 256), random-init
parameters, a 65-token vocabulary (tiny_shakespeare's). Policies of `sample.generate`: `dense`;
`fixed` at each fraction; `random` (a fresh draw a = 1 - lam*B per time step), with the config's
activation settings (ra :gpu: nested, sites mlp,heads, 6 buckets, a ~ U[0.25, 1]).

What is timed is the steady state. The sampler gets a prompt of T/2 tokens and generates
`num_tokens` (a multiple of T/2) greedy tokens: it rebuilds its cache from the last T/2 tokens
every T/2 tokens, and the prompt's prefill stands for one such rebuild, so time / num_tokens is
the long-run cost per token, rebuilds included. The baseline (`full_rerun`) is nanoGPT's
`generate` compiled into one loop: for every token, the forward pass over a fixed T-token window
(nanoGPT's cost once its context is full). A step is one token for every row of the batch.
Medians over `repeats` calls, interleaved over the programs; compilation excluded (compile_s).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

_CONFIG = flags.DEFINE_string('config', 'configs/ra_shakespeare_char.py:gpu',
                              'Model size and activation settings.')
_BATCHES = flags.DEFINE_list('batches', ['1', '16'], 'Sequences decoded together.')
_FRACTIONS = flags.DEFINE_list('fractions', ['0.75', '0.5', '0.25'], 'Fixed active fractions.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 256, 'Tokens per timed run (a multiple of T/2).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per point (after one warm-up run).')
_BASELINE_TOKENS = flags.DEFINE_integer('baseline_tokens', 32, 'Tokens per timed baseline run.')
_BASELINE_BATCHES = flags.DEFINE_list('baseline_batches', ['1'], 'Batches of the baseline.')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)

VOCAB = 65


@functools.partial(jax.jit, static_argnames=('model', 'num_tokens'))
def full_rerun(params, model: gpt.GPT, prompt_BxP: jax.Array, *, num_tokens: int) -> jax.Array:
  """nanoGPT's generate (greedy), compiled: every token runs the forward pass over the last T
  tokens. The window has a fixed size T; while the text is shorter it starts at 0 and the
  logits after the last real token are read (causal attention ignores what follows)."""
  B, P = prompt_BxP.shape
  T, N = model.cfg.block_size, P + num_tokens
  W = max(N, T)  # buffer width
  tokens_BxW = jnp.zeros((B, W), jnp.int32).at[:, :P].set(prompt_BxP)

  def step(t, tokens_BxW):
    start = jnp.clip(t - T, 0, W - T)
    logits_BxTxV, _ = model.apply({'params': params},
                                  jax.lax.dynamic_slice_in_dim(tokens_BxW, start, T, axis=1))
    next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BxTxV, t - 1 - start, 1, False), -1)
    return jax.lax.dynamic_update_slice_in_dim(tokens_BxW, next_B[:, None].astype(jnp.int32), t,
                                               axis=1)

  return jax.lax.fori_loop(P, N, step, tokens_BxW)[:, :N]


@dataclasses.dataclass
class Program:
  """One compiled generation program and its timings."""
  point: dict            # what is measured (policy, fraction, batch, ...), filled in by `run`
  compiled: Any
  args: tuple
  num_tokens: int
  out: Any = None        # the warm-up run's output
  ms: list = dataclasses.field(default_factory=list)

  @classmethod
  def compile(cls, point: dict, lower, args, num_tokens: int) -> 'Program':
    start = time.perf_counter()
    compiled = lower().compile()
    point = {**point, 'num_tokens': num_tokens, 'compile_s': time.perf_counter() - start}
    program = cls(point, compiled, args, num_tokens)
    program.out = jax.device_get(compiled(*args))  # warm-up
    return program

  def finish(self) -> dict:
    ms_per_step = np.asarray(self.ms) / self.num_tokens  # a step: one token of every row
    self.point.update(ms_per_step=bench_common.stats(ms_per_step), tokens_per_sec=float(
        self.point['batch'] / (np.median(ms_per_step) / 1e3)))
    return self.point


def policies(fractions) -> list[tuple[str, float | None]]:
  return [('dense', None)] + [('fixed', a) for a in fractions] + [('random', None)]


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  config = bench_common.load_config(_CONFIG.value)
  cfg = gpt.GPTConfig.from_config(config.model, VOCAB)
  model = gpt.GPT(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, cfg.block_size), jnp.int32))['params']
  act = ml_collections.FrozenConfigDict(config.activation)
  half = cfg.block_size // 2
  num_tokens = _NUM_TOKENS.value
  if num_tokens % half:
    raise app.UsageError(f'--num_tokens must be a multiple of T/2 = {half}.')
  rng = np.random.default_rng(0)
  prompts = {b: jnp.asarray(rng.integers(0, VOCAB, (b, half)), jnp.int32)
             for b in sorted({int(b) for b in _BATCHES.value + _BASELINE_BATCHES.value})}
  key = jax.random.key(0)
  load_start = os.getloadavg()

  programs, baselines = {}, []
  for batch in (int(b) for b in _BATCHES.value):
    for policy, a in policies(float(a) for a in _FRACTIONS.value):
      knobs = dict(num_tokens=num_tokens, greedy=True, policy=policy, active_fraction=a,
                   act=None if policy == 'dense' else act)
      program = Program.compile(
          {'policy': policy, 'active_fraction': a, 'batch': batch},
          lambda: sample_lib.generate.lower(params, model, prompts[batch], key, **knobs),
          (params, prompts[batch], key), num_tokens)
      program.point['realized_fraction'] = float(np.mean(program.out[1]))
      programs[(policy, a, batch)] = program
      print(program.point, flush=True)
  for batch in (int(b) for b in _BASELINE_BATCHES.value):
    n = _BASELINE_TOKENS.value
    program = Program.compile(
        {'policy': 'full_rerun', 'batch': batch},
        lambda: full_rerun.lower(params, model, prompts[batch], num_tokens=n),
        (params, prompts[batch]), n)
    if ('dense', None, batch) in programs:  # both greedy, same context until T: same text
      program.point['same_tokens_as_cached'] = bool(np.array_equal(
          program.out, programs[('dense', None, batch)].out[0][:, :half + n]))
    baselines.append(program)
    print(program.point, flush=True)
  # Repeats interleave the programs, so that load from other processes touches all alike.
  for _ in range(_REPEATS.value):
    for program in [*programs.values(), *baselines]:
      program.ms += bench_common.time_calls(program.compiled, *program.args, repeats=1)

  points = {k: p.finish() for k, p in programs.items()}
  ms = {k: p['ms_per_step']['median'] for k, p in points.items()}
  for (_, _, batch), p in points.items():
    p['time_vs_dense'] = p['ms_per_step']['median'] / ms[('dense', None, batch)]
  baseline = [p.finish() for p in baselines]
  summary = {'speedup_vs_full_rerun': {
      str(b['batch']): b['ms_per_step']['median'] / ms[('dense', None, b['batch'])]
      for b in baseline if ('dense', None, b['batch']) in ms}}
  if ('fixed', 0.5, 1) in ms:
    summary['time_a0.5_vs_dense_batch1'] = ms[('fixed', 0.5, 1)] / ms[('dense', None, 1)]
  summary['targets'] = {'speedup_vs_full_rerun': '>= 20', 'time_a0.5_vs_dense_batch1': '<= 0.6'}
  result = {'config': _CONFIG.value, 'model': dict(config.model), 'vocab_size': VOCAB,
            'activation': config.activation.to_dict(), 'prompt_tokens': half,
            'num_tokens': num_tokens, 'baseline_tokens': _BASELINE_TOKENS.value,
            'repeats': _REPEATS.value, **bench_common.environment(),
            'points': list(points.values()), 'baseline': baseline, 'summary': summary,
            'peak_host_rss_mib': bench_common.peak_rss_mib(),
            'load_average': {'start': load_start, 'end': os.getloadavg()}}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(f'wrote {_OUT.value}')
  print(f"{'policy':>10} {'a':>5} {'batch':>5} {'ms/step':>8} {'tokens/s':>9} {'vs dense':>8}")
  for p in result['points'] + baseline:
    a = '' if p.get('active_fraction') is None else f"{p['active_fraction']:.2f}"
    vs = f"{p['time_vs_dense']:.2f}x" if 'time_vs_dense' in p else ''
    print(f"{p['policy']:>10} {a:>5} {p['batch']:>5} {p['ms_per_step']['median']:>8.3f} "
          f"{p['tokens_per_sec']:>9.1f} {vs:>8}")
  print(summary)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
