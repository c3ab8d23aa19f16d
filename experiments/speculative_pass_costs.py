"""What one self-speculative iteration is made of: a draft step and a verifying pass, each timed
inside a compiled loop against a dense decode step, batch 1.

    .venv/bin/python experiments/speculative_pass_costs.py --workdir=RUN \
        --out=results/speculative_pass_costs.json [--draft_fraction=0.5] [--positions=1,3,5,7]

Every program feeds L tokens at position `--at` of a prefilled cache (the full model for
L in `--positions`; the nested sub-model at `--draft_fraction`, as `rag_jax.speculative` slices
it, for L = 1), `--loop` times in a `lax.fori_loop` that carries the cache (as the sampler's
loop does: a pass inside a compiled loop, without a call's dispatch and argument handling, which
made a quarter-width step look 0.54x a dense one as a single call and 0.15-0.18x in a loop),
compiled with the sampler's compiler options; programs are interleaved for `--repeats` rounds
and the medians per pass written with their ratio to the full model's L = 1 step. A k-token
iteration costs about k draft steps plus one pass over k + 1 positions: that sum, per committed
token, is the bound on the speed-up experiments/bench_speculative.py can measure. `bound`, per
k with a k + 1 pass timed: the iteration's cost in dense steps, the speed-up if all k drafts were
accepted, and, given `--speculative_json` (bench_speculative's output for the same run and
draft width), the speed-up its measured tokens per full pass would give (greedy and sampled)
beside the one it measured: the gap is the loop's own cost.
"""
from __future__ import annotations

import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import activation
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt
from rag_jax.models import submodel

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_FRACTION = flags.DEFINE_float('draft_fraction', 0.5, 'Draft width.')
_POSITIONS = flags.DEFINE_list('positions', ['1', '3', '5', '7'], 'Full-model pass lengths.')
_AT = flags.DEFINE_integer('at', 32, 'Cache position the passes start at.')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Interleaved rounds.')
_LOOP = flags.DEFINE_integer('loop', 20, 'Passes per compiled call (a fori_loop).')
_SPECULATIVE_JSON = flags.DEFINE_string(
    'speculative_json', None, 'bench_speculative.py output for this run: bound per k from its '
    'measured tokens per full pass.')


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  run = runs.load_run(_WORKDIR.value)
  model, params, cfg = run.model, run.params, run.model.cfg
  plan = activation.make_plan(jax.random.key(0), run.config.activation, cfg,
                              fraction=_FRACTION.value)
  d_params, d_model = submodel.submodel(params, model, plan)
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
    def passes(p, t, c, pos, m=m):
      body = lambda i, c: m.apply({'params': p}, t + i % 2, cache=c, pos=pos)[1]
      return jax.lax.fori_loop(0, _LOOP.value, body, c)

    args = (p, jnp.zeros((1, L), jnp.int32), cache, jnp.int32(_AT.value))
    programs[name] = (jax.jit(passes).lower(*args).compile(options), args)
  ms = {name: [] for name in programs}
  for _ in range(_REPEATS.value):
    for name, (compiled, args) in programs.items():
      ms[name].append(bench_common.time_calls(compiled, *args, repeats=1)[0] / _LOOP.value)
  base = float(np.median(ms['full_1']))
  rows = {name: {'ms': bench_common.stats(v), 'vs_full_1': float(np.median(v)) / base}
          for name, v in ms.items()}
  measured = (files.read_json(_SPECULATIVE_JSON.value)['programs'] if _SPECULATIVE_JSON.value
              else {})
  draft = rows['draft_1']['vs_full_1']
  bound = {}
  for L in map(int, _POSITIONS.value):
    k = L - 1
    if k < 1:
      continue
    cost = k * draft + rows[f'full_{L}']['vs_full_1']
    entry = {'iteration_in_dense_steps': cost, 'speedup_if_all_accepted': (k + 1) / cost}
    for mode, suffix in (('greedy', ''), ('sampled', '_sampled')):
      row = measured.get(f'spec_{_FRACTION.value}_shared_k{k}{suffix}')
      if row:
        entry[mode] = {'tokens_per_full_pass': row['tokens_per_full_pass'],
                       'speedup_from_pass_costs': row['tokens_per_full_pass'] / cost,
                       'speedup_measured': row['speedup_vs_dense']}
    bound[k] = entry
  result = {'workdir': _WORKDIR.value, 'step': int(run.step), 'draft_fraction': _FRACTION.value,
            'at': _AT.value, 'loop': _LOOP.value, 'programs': rows, 'bound': bound,
            'speculative_json': _SPECULATIVE_JSON.value, **bench_common.environment()}
  files.write_json(_OUT.value, result)
  for name, row in rows.items():
    print(f"{name:10s} {row['ms']['median']:8.3f} ms  {row['vs_full_1']:.2f}x a dense step",
          file=sys.stderr)
  for k, entry in bound.items():
    line = (f"k={k}: iteration {entry['iteration_in_dense_steps']:.2f} dense steps, "
            f"{entry['speedup_if_all_accepted']:.2f}x if all accepted")
    for mode in ('greedy', 'sampled'):
      if mode in entry:
        e = entry[mode]
        line += (f"; {mode} {e['tokens_per_full_pass']:.2f} tokens/pass -> "
                 f"{e['speedup_from_pass_costs']:.2f}x (measured {e['speedup_measured']:.2f}x)")
    print(line, file=sys.stderr)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
