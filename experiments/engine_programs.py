"""What the adaptive policy's passes cost a slot engine whose slots are all fixed: the decode
step of an engine without the policy, of one with it (generate_steps' program with the policy's
passes, which cost nothing while no slot escalates but are there), and of the same engine's
program without them (`adaptive=False`, what the scheduler runs while no live slot is
adaptive). Every slot live, greedy, at the full width; interleaved rounds, paired ratios.

    python experiments/engine_programs.py --workdir=RUN --out=results/serve/engine_programs_cpu.json
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import policies
from rag_jax import runs

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_SLOTS = flags.DEFINE_integer('slots', 16, 'Decode slots.')
_STEPS = flags.DEFINE_integer('steps_per_call', 8, 'Engine steps per call.')
_ROUNDS = flags.DEFINE_integer('rounds', 15, 'Interleaved rounds.')
_CALLS = flags.DEFINE_integer('calls', 5, 'Calls per measurement in a round.')


def main(argv):
  del argv
  run = runs.load_run(_WORKDIR.value)
  act = run.config.activation
  policy = policies.make('adaptive', act, run.config.model, fraction=0.5)
  calls = {'plain': bench_common.engine_decoding(run, _SLOTS.value, _STEPS.value)[1],
           'with_passes': bench_common.engine_decoding(run, _SLOTS.value, _STEPS.value,
                                                       policy=policy)[1],
           'without_passes': bench_common.engine_decoding(run, _SLOTS.value, _STEPS.value,
                                                          policy=policy, adaptive=False)[1]}
  for call in calls.values():  # compile and warm
    for _ in range(3):
      jax.device_get(call())
  ms = {k: [] for k in calls}
  for _ in range(_ROUNDS.value):
    for name, call in calls.items():
      start = time.perf_counter()
      for _ in range(_CALLS.value):
        jax.device_get(call())
      ms[name].append(1000 * (time.perf_counter() - start) / (_CALLS.value * _STEPS.value))
  ratio = lambda a, b: float(np.median(np.asarray(ms[a]) / np.asarray(ms[b])))
  out = {'workdir': _WORKDIR.value, 'slots': _SLOTS.value, 'steps_per_call': _STEPS.value,
         'rounds': _ROUNDS.value, 'cores': os.cpu_count(), 'command': ' '.join(sys.argv),
         'ms_per_step': {k: float(np.median(v)) for k, v in ms.items()},
         'with_passes_over_plain': ratio('with_passes', 'plain'),
         'without_passes_over_plain': ratio('without_passes', 'plain')}
  files.write_json(_OUT.value, out)
  print(out['ms_per_step'], 'with/plain %.2f, without/plain %.2f' % (
      out['with_passes_over_plain'], out['without_passes_over_plain']))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
