"""Why per-token random widths do not make a batch-1 CPU decode step cheaper: the weights' working
set. A stack of GELU MLPs (the `:gpu` model's shapes by default: 6 layers, 384 -> 1536 -> 384,
float32, 6 buckets), one token at a time in a compiled loop of `--tokens` steps:

  dense        every layer at its full width (one [D, F] and one [F, D] product);
  copies       the sampler's decode layout (`widths.Prefixes`): one separate array per width a
               draw can give (2/6 .. 6/6 of the units: 3.3x the weights), a `lax.switch` per
               layer picks the drawn width's array, read in place;
  pieces       one array per bucket (1x the weights): width j/6 runs j products of a sixth of
               the units and sums them.

Each layout runs under three draw patterns: `random` (a bucket from 2/6 to 6/6 per layer and
token, uniform: mean width 0.67), `full` (6/6 always) and `half` (3/6 always). Medians of
`--repeats` interleaved calls, ms per token and the ratio to dense; the JSON also records each
layout's bytes.

    .venv/bin/python experiments/decode_working_set.py --out=results/decode_working_set_cpu.json

What it separates: `copies` under `full` costs what dense does (the switch is free) and under
`half` about half (a narrow product is cheap when its weights are the only ones in use); under
`random` every width's copy is in use, 3.3x dense's bytes, beyond the caches, and the step costs
more than dense although it computes 0.67 of it. `pieces` keeps dense's bytes but pays per
product (6 products at the full width).
"""
from __future__ import annotations

import functools
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import sample as sample_lib

_LAYERS = flags.DEFINE_integer('layers', 6, 'MLP layers.')
_EMBED = flags.DEFINE_integer('embed_dim', 384, 'D.')
_MLP = flags.DEFINE_integer('mlp_dim', 1536, 'F.')
_BUCKETS = flags.DEFINE_integer('buckets', 6, 'Widths are j/buckets of F.')
_SMALLEST = flags.DEFINE_integer('smallest', 2, 'Smallest bucket a draw gives (2: a >= 1/3).')
_TOKENS = flags.DEFINE_integer('tokens', 64, 'Decode steps per compiled call.')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Interleaved rounds.')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)


def mlp(x, w_in, w_out):
  return jax.nn.gelu(x @ w_in) @ w_out


def main(argv):
  del argv
  L, D, F, NB, lo, T = (_LAYERS.value, _EMBED.value, _MLP.value, _BUCKETS.value,
                        _SMALLEST.value, _TOKENS.value)
  if F % NB or not 1 <= lo <= NB:
    raise SystemExit(f'error: mlp_dim {F} must split into {NB} buckets, 1 <= smallest <= {NB}')
  rng = np.random.default_rng(0)
  w_in = [jnp.asarray(rng.standard_normal((D, F), np.float32) * 0.05) for _ in range(L)]
  w_out = [jnp.asarray(rng.standard_normal((F, D), np.float32) * 0.05) for _ in range(L)]
  buckets = list(range(lo, NB + 1))               # branch b runs bucket buckets[b]
  P = F // NB
  layouts = {
      'dense': [(a, b) for a, b in zip(w_in, w_out)],
      'copies': [([a[:, :j * P] for j in buckets], [b[:j * P] for j in buckets])
                 for a, b in zip(w_in, w_out)],
      'pieces': [([a[:, i * P:(i + 1) * P] for i in range(NB)],
                  [b[i * P:(i + 1) * P] for i in range(NB)]) for a, b in zip(w_in, w_out)],
  }

  def decode(layer):
    """T tokens through the stack; `layer(weights, draw, x)` is one layer's update."""
    def run(x, weights, draws):
      def body(t, x):
        for l, w in enumerate(weights):
          x = x + layer(w, draws[t, l], x)
        return x * 0.5
      return jax.lax.fori_loop(0, T, body, x)
    return run

  def dense(w, draw, x):
    del draw
    return mlp(x, *w)

  def copies(w, draw, x):  # branch b: the copy of bucket buckets[b]
    return jax.lax.switch(draw, [functools.partial(mlp, w_in=a, w_out=b) for a, b in zip(*w)], x)

  def pieces(w, draw, x):  # branch b: the first buckets[b] pieces
    ins, outs = w
    return jax.lax.switch(draw, [lambda x, j=j: sum(mlp(x, ins[i], outs[i]) for i in range(j))
                                 for j in buckets], x)

  fns = {'dense': decode(dense), 'copies': decode(copies), 'pieces': decode(pieces)}
  options = sample_lib.compiler_options()
  patterns = {'random': rng.integers(0, len(buckets), size=(T, L)),
              'full': np.full((T, L), len(buckets) - 1), 'half': np.full((T, L), NB // 2 - lo)}
  x = jnp.asarray(rng.standard_normal((1, D), np.float32))
  compiled = {name: jax.jit(fn).lower(x, layouts[name], jnp.zeros((T, L), jnp.int32))
              .compile(options) for name, fn in fns.items()}
  results = {}
  for pattern, draws in patterns.items():
    draws = jnp.asarray(draws, jnp.int32)
    widths = np.asarray(buckets)[np.asarray(draws)] / NB
    ms = {name: [] for name in fns}
    out = {name: np.asarray(compiled[name](x, layouts[name], draws)) for name in fns}  # warm-up
    # The layouts compute the same widths: copies and pieces agree at every draw, and at the
    # full width both are the dense layer (the timings compare equal work).
    agree = {'pieces_vs_copies': float(np.abs(out['pieces'] - out['copies']).max())}
    if pattern == 'full':
      agree['copies_vs_dense'] = float(np.abs(out['copies'] - out['dense']).max())
    for _ in range(_REPEATS.value):
      for name in fns:
        ms[name].append(bench_common.time_calls(compiled[name], x, layouts[name], draws,
                                                repeats=1)[0] / T)
    base = float(np.median(ms['dense']))
    results[pattern] = {
        'mean_width': float(widths.mean()), 'max_abs_difference': agree,
        'layouts': {name: {'ms_per_token': bench_common.stats(v),
                           'vs_dense': float(np.median(v)) / base} for name, v in ms.items()}}
    print(f'{pattern:7s} (mean width {widths.mean():.2f}): ' + ', '.join(
        f"{name} {float(np.median(v)):.3f} ms ({float(np.median(v)) / base:.2f}x)"
        for name, v in ms.items()), file=sys.stderr)
  nbytes = {name: int(sum(a.nbytes for a in jax.tree.leaves(w))) for name, w in layouts.items()}
  result = {'layers': L, 'embed_dim': D, 'mlp_dim': F, 'buckets': NB, 'drawn_buckets': buckets,
            'tokens': T, 'repeats': _REPEATS.value, 'weight_bytes': nbytes,
            'patterns': results, **bench_common.environment()}
  files.write_json(_OUT.value, result)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
