"""What the learned width router costs per decode step, on models of any shape (no training).

    .venv/bin/python experiments/router_cost.py --config=configs/ra_shakespeare_char.py:large \
        --out=results/router/cost_large_cpu.json [--vocab=65] [--draft_fraction=0.5]

A step's time does not depend on the weights' values, so the model and the router (the shape
rag_jax/router.py fits: a two-layer MLP of `--hidden` units on the narrow pass's final hidden
state, top-1 log-probability and entropy) are initialised at random. The compiled sampler
(rag_jax/decode.py) generates the rest of the context after an 8-token prompt with: the
narrow and the full fixed widths, policy adaptive by confidence at threshold 0 and by the
router at a threshold no prediction reaches (so neither escalates: both run the narrow pass
and their difference is the router's), programs interleaved for `--rounds` rounds. The router's
cost is the median ms per token of the router's program over the confidence rule's, minus 1
(and the median and quartiles of that ratio paired by round), and the same difference against
a full-width step; at batch 1 and 8.
"""
from __future__ import annotations

import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

import bench_common

from rag_jax import cli
from rag_jax import decode
from rag_jax import files
from rag_jax import flops
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import runs
from rag_jax import workdir as workdir_lib

PROMPT = 8


def _define_flags():  # at run time only: tests import this module beside other scripts' flags
  config_flags.DEFINE_config_file('config', 'configs/ra_shakespeare_char.py',
                                  'A nested RA config (its model and activation).',
                                  lock_config=True)
  flags.DEFINE_integer('vocab', 0, 'Vocabulary size (0: config.data.vocab_size, or 65 for '
                       'characters).')
  flags.DEFINE_float('draft_fraction', 0.5, 'The narrow width of policy adaptive.')
  flags.DEFINE_integer('hidden', 128, "The router's hidden units.")
  flags.DEFINE_list('batches', ['1', '8'], 'Rows decoded at once.')
  flags.DEFINE_integer('rounds', 21, 'Interleaved rounds (the median is reported).')
  flags.DEFINE_string('out', None, 'JSON output.', required=True)


def programs(model, act, fraction: float, router) -> dict:
  """{name: policy} of the four programs compared."""
  return {
      'fixed_narrow': policies.make('fixed', act, fraction=fraction),
      'fixed_full': policies.make('dense', act),
      'confidence_never': policies.make('adaptive', act, fraction=fraction, threshold=0.0),
      'router_never': policies.make('adaptive', act, fraction=fraction, threshold=1e30,
                                    router=router)}


def measure(params, model, act, fraction: float, router, batch: int, rounds: int) -> dict:
  """Median ms per generated token of each program at `batch` rows (compilation excluded),
  and each program's escalated share (0 by construction; checked)."""
  T = model.cfg.block_size
  tokens = T - PROMPT
  prompt = jax.random.randint(jax.random.key(1), (batch, PROMPT), 0, model.cfg.vocab_size)
  args = (params, prompt, jax.random.key(2), jnp.full((batch,), PROMPT, jnp.int32),
          jnp.arange(batch))
  compiled = {}
  for name, policy in programs(model, act, fraction, router).items():
    compiled[name] = decode.generate.lower(params, model, *args[1:], num_tokens=tokens,
                                           greedy=True, policy=policy).compile()
  ms = {name: [] for name in compiled}
  escalated = {}
  for _ in range(rounds):
    for name, fn in compiled.items():
      ms[name] += [t / tokens for t in bench_common.time_calls(fn, *args, repeats=1)]
      if name.endswith('never'):  # an escalated token's fraction counts both passes: > 1
        escalated[name] = float(np.mean(np.asarray(fn(*args)[1]) > 1.0))
  out = {name: {'ms_per_token': bench_common.stats(v)['median'], 'all': v}
         for name, v in ms.items()}
  med = {name: v['ms_per_token'] for name, v in out.items()}
  out['router_cost_vs_adaptive_step'] = med['router_never'] / med['confidence_never'] - 1
  out['router_cost_vs_full_step'] = (med['router_never'] - med['confidence_never']) / med[
      'fixed_full']
  # Paired by round (the two programs ran back to back): robust to the machine's drift.
  paired = np.asarray(ms['router_never']) / np.asarray(ms['confidence_never']) - 1
  out['router_cost_paired'] = {'median': float(np.median(paired)),
                               'p25': float(np.percentile(paired, 25)),
                               'p75': float(np.percentile(paired, 75))}
  out['escalated'] = escalated
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  act = config.activation
  if not (act.enabled and act.structure == 'nested'):
    sys.exit('error: --config must be a nested random-activation config')
  if not 0 < f.draft_fraction < 1:
    sys.exit(f'error: --draft_fraction must be in (0, 1), got {f.draft_fraction}')
  vocab = f.vocab or config.data.get('vocab_size', 0) or 65
  workdir_lib.quiet_logs()
  model = runs.make_model(config, vocab)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  D = model.cfg.embed_dim + 2
  router = router_lib.Router(router_lib.init(jax.random.key(3), D, f.hidden, np.zeros(D),
                                             np.ones(D)), f.draft_fraction)
  result = {
      'config': str(config_flags.get_config_filename(flags.FLAGS['config'])),
      'parameters': int(sum(x.size for x in jax.tree.leaves(params))),
      'model_flops_per_token': float(flops.flops_per_token(model.cfg)),
      'router_parameters': int(sum(np.size(v) for k, v in router.params.items()
                                   if k not in ('mean', 'std'))),
      'router_flops_per_token': float(2 * D * f.hidden + 2 * f.hidden),
      'draft_fraction': f.draft_fraction, 'block_size': model.cfg.block_size,
      'command': ' '.join(sys.argv), 'environment': bench_common.environment()}
  for b in f.batches:
    result[f'batch{b}'] = measure(params, model, act, f.draft_fraction, router, int(b),
                                  f.rounds)
    r = result[f'batch{b}']
    print(f'batch {b}: ' + ', '.join(f'{k} {r[k]["ms_per_token"]:.3f} ms' for k in (
        'fixed_narrow', 'fixed_full', 'confidence_never', 'router_never'))
          + f'; router {100 * r["router_cost_vs_adaptive_step"]:+.1f}% of an adaptive step '
          f'(paired by round: median {100 * r["router_cost_paired"]["median"]:+.1f}%, '
          f'quartiles {100 * r["router_cost_paired"]["p25"]:+.1f}%, '
          f'{100 * r["router_cost_paired"]["p75"]:+.1f}%), '
          f'{100 * r["router_cost_vs_full_step"]:+.1f}% of a full one')
  files.write_json(f.out, result)
  print(f'wrote {f.out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags_with_output)
