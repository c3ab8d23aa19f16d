"""What one self-speculative iteration is made of: a draft step and a verifying pass, each timed
as a single compiled call against a dense decode step, batch 1.

    .venv/bin/python experiments/speculative_pass_costs.py --workdir=RUN \
        --out=results/speculative_pass_costs.json [--draft_fraction=0.5] [--positions=1,3,5,7]

Every program feeds L tokens at position `--at` of a prefilled cache (the full model for
L in `--positions`; the nested sub-model at `--draft_fraction`, as `rag_jax.speculative` slices
it, for L = 1), compiled with the sampler's compiler options; calls are interleaved for
`--repeats` rounds and the medians written with their ratio to the full model's L = 1 step. A
k-token iteration costs about k draft steps plus one pass over k + 1 positions: that sum, per
accepted token, is the bound on the speed-up experiments/bench_speculative.py can measure.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common

from rag_jax import activation
from rag_jax import export
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_FRACTION = flags.DEFINE_float('draft_fraction', 0.5, 'Draft width.')
_POSITIONS = flags.DEFINE_list('positions', ['1', '3', '5', '7'], 'Full-model pass lengths.')
_AT = flags.DEFINE_integer('at', 32, 'Cache position the passes start at.')
_REPEATS = flags.DEFINE_integer('repeats', 30, 'Interleaved rounds.')


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  run = runs.load_run(_WORKDIR.value)
  model, params, cfg = run.model, run.params, run.model.cfg
  plan = activation.make_plan(jax.random.key(0), run.config.activation, cfg,
                              fraction=_FRACTION.value)
  d_params, d_model = export.submodel(params, model, plan)
  options = sample_lib.compiler_options()

  def prefilled(m, p):
    prompt = jnp.zeros((1, _AT.value), jnp.int32)
    return jax.jit(lambda p, t: m.apply({'params': p}, t, cache=gpt.init_cache(m.cfg, 1),
                                        pos=0)[1])(p, prompt)

  full_cache, draft_cache = prefilled(model, params), prefilled(d_model, d_params)
  programs = {}
  for name, m, p, cache, L in ([(f'full_{L}', model, params, full_cache, int(L))
                                for L in _POSITIONS.value]
                               + [('draft_1', d_model, d_params, draft_cache, 1)]):
    fn = jax.jit(lambda p, t, c, pos, m=m: m.apply({'params': p}, t, cache=c, pos=pos))
    args = (p, jnp.zeros((1, L), jnp.int32), cache, jnp.int32(_AT.value))
    programs[name] = (fn.lower(*args).compile(options), args)
  ms = {name: [] for name in programs}
  for _ in range(_REPEATS.value):
    for name, (compiled, args) in programs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      ms[name].append(1e3 * (time.perf_counter() - t0))
  base = float(np.median(ms['full_1']))
  rows = {name: {'ms': bench_common.stats(v), 'vs_full_1': float(np.median(v)) / base}
          for name, v in ms.items()}
  result = {'workdir': _WORKDIR.value, 'step': int(run.step), 'draft_fraction': _FRACTION.value,
            'at': _AT.value, 'programs': rows, **bench_common.environment()}
  files.write_json(_OUT.value, result)
  for name, row in rows.items():
    print(f"{name:10s} {row['ms']['median']:8.3f} ms  {row['vs_full_1']:.2f}x a dense step",
          file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
