"""What batching can buy on this machine: a trained run's weight products at batch 1 and at S
rows, the slot engine's step at 1 and S slots, and the compiled sampler one request at a time.

    python experiments/batching_ceiling.py --workdir=RUN \
        --out=results/serve/batching_ceiling_cpu.json [--slots=16] [--steps_per_call=8]

`products`: the run's per-token matrix products alone (for each block: queries, keys and
values, attention output, MLP in and out; then the output head), jitted, at batch 1 and at batch
`slots`: the most a batch of S tokens can gain over S single tokens when nothing else costs.
`engine`: seconds per decode step of `rag_jax.engine.Engine` with every slot live and greedy
(`steps_per_call` steps per call), at 1 and S slots, full width and half width. `sample`:
`rag_jax.sample --greedy` tokens/s, one 256-token request at a time (generation time only).
Medians of `repeats`. A server's tokens/s at S concurrent requests is bounded by
S / engine step(S); against one-at-a-time sampling, by that over `sample`.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_SLOTS = flags.DEFINE_integer('slots', 16, 'Rows of the batched measurements.')
_STEPS = flags.DEFINE_integer('steps_per_call', 8, 'Engine steps per call.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (medians).')


def median_seconds(fn, calls: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return float(np.median(times))


def products(params, rows: int) -> float:
  """Seconds for one pass of the run's weight products over `rows` tokens."""
  layers = [params[k] for k in sorted(params) if k.startswith('block_')]
  D = params['wte'].shape[1]

  @jax.jit
  def chain(x):
    for p in layers:
      a, m = p['attn'], p['mlp']
      q = x @ a['query'].reshape(D, -1)
      kv = x @ a['key_value'].reshape(D, -1)
      x = x + (q + kv[:, :q.shape[1]]) @ a['out'].reshape(-1, D)
      x = x + jax.nn.gelu(x @ m['w_in']) @ m['w_out']
    return x @ params['wte'].T
  x = jnp.ones((rows, D), jnp.float32)
  return median_seconds(lambda: chain(x), 200)


def engine_step(run, slots: int, fraction: float) -> float:
  _, call = bench_common.engine_decoding(run, slots, _STEPS.value, fraction)
  return median_seconds(call, 32) / _STEPS.value


def main(argv):
  del argv
  run = runs.load_run(_WORKDIR.value)
  S = _SLOTS.value
  out = {'workdir': _WORKDIR.value, 'command': ' '.join(sys.argv), 'cores': os.cpu_count(),
         'slots': S, 'steps_per_call': _STEPS.value}
  one, many = products(run.params, 1), products(run.params, S)
  out['products'] = {'batch_1_s': one, f'batch_{S}_s': many, 'ceiling': S * one / many}
  out['engine'] = {f'{f:g}': {'slots_1_step_s': engine_step(run, 1, f),
                              f'slots_{S}_step_s': engine_step(run, S, f)} for f in (1.0, 0.5)}
  samples = [sample_lib.sample(run.params, run.config, 'The ', tokenizer=run.tokenizer,
                               num_tokens=256, greedy=True) for _ in range(_REPEATS.value + 1)]
  out['sample_tokens_per_s'] = float(np.median([s.num_generated / s.seconds
                                                for s in samples[1:]]))
  full = out['engine']['1']
  out['engine_over_sample'] = S / full[f'slots_{S}_step_s'] / out['sample_tokens_per_s']
  out['half_over_full'] = full[f'slots_{S}_step_s'] / out['engine']['0.5'][f'slots_{S}_step_s']
  files.write_json(_OUT.value, out)
  print(f"weight products: batch {S} costs {many / one:.1f}x batch 1 (ceiling "
        f"{out['products']['ceiling']:.2f}x); engine at {S} slots: "
        f"{S / full[f'slots_{S}_step_s']:.0f} tokens/s = {out['engine_over_sample']:.2f}x "
        f"one-at-a-time sampling ({out['sample_tokens_per_s']:.0f}); half width "
        f"{out['half_over_full']:.2f}x full")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
