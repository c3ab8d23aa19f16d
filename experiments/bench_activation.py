"""Does the random activation really skip compute? Train-step and decode-step time, and FLOPs.

    python experiments/bench_activation.py --out=results/bench_activation.json \
        [--config=configs/shakespeare_char.py:gpu] [--batch_size=8] [--fractions=1,0.75,0.5,0.25]
        [--sites="mlp;heads;layers;mlp,heads"] [--structures=nested,random,bernoulli]

For each site set, structure and active fraction a it times the production programs:
  - train: `train.make_train_step` (draws its plan inside the step and runs one `lax.switch`
    branch per site), median over `--train_steps` steps after compilation;
  - decode (drawn): `sample.generate` (prefill + `lax.while_loop`, a fresh draw per token,
    policy `random`: one `lax.switch` per site and layer at every token), median over
    `--decode_repeats` runs of `--decode_tokens` tokens, per token;
  - decode_fixed: the same loop with policy `fixed` at a (the sub-model of width a, static
    shapes, what `python -m rag_jax.sample --active_fraction=a` runs).
Every draw is pinned to a: lam = 1, B ~ Beta(1000, 0.001) is 1 to float precision, and
min_active = a floors the fraction at a (the realized fraction each program reports is
recorded and checked). Speedups are against the dense model (activation off) in the same run;
the ideal speedup is the ratio of analytic FLOPs per token (models.flops.flops_per_token, which
the tests hold against XLA's cost analysis); `xla_flops_per_token` is XLA's count for the
forward pass compiled at the static width.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import activation
from rag_jax import files
from rag_jax import flops
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import sharding
from rag_jax import train
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

_CONFIG = flags.DEFINE_string('config', 'configs/shakespeare_char.py:gpu', 'Model config.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Train batch (the :gpu recipe uses 64).')
_FRACTIONS = flags.DEFINE_list('fractions', ['1', '0.75', '0.5', '0.25'], 'Active fractions.')
_SITES = flags.DEFINE_string('sites', 'mlp;heads;layers;mlp,heads', 'Site sets, ;-separated.')
_STRUCTURES = flags.DEFINE_list('structures', ['nested', 'random', 'bernoulli'], 'Structures.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 5, 'Timed train steps per point.')
_DECODE_TOKENS = flags.DEFINE_integer('decode_tokens', 128, 'Tokens per timed decode run.')
_DECODE_REPEATS = flags.DEFINE_integer('decode_repeats', 5, 'Timed decode runs per point.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 1, 'Sequences decoded together.')
_BUCKETS = flags.DEFINE_integer(
    'buckets', 0, 'Static widths per site; 0: 4 when it divides every width, else the number of '
    'heads (6 for :gpu, widths 1/6..6/6). Ideal speedups use the realized widths.')
_SKIP_TRAIN = flags.DEFINE_bool('skip_train', False, 'Only time decoding.')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)


def pinned(act: ml_collections.ConfigDict, a: float) -> ml_collections.ConfigDict:
  """Activation settings whose every draw is exactly `a` (see the module docstring)."""
  act = ml_collections.ConfigDict(act.to_dict())
  act.update(enabled=True, lam=1.0, alpha=1000.0, beta=0.001, min_active=float(a))
  return act


def time_train(config, model, tx, steps: int) -> dict:
  shard = sharding.Shardings.of(sharding.make_mesh(config),
                             jax.eval_shape(lambda k: runs.init_state(model, tx, k, config),
                                            jax.random.key(0)))
  state = jax.jit(lambda k: runs.init_state(model, tx, k, config),
                  out_shardings=shard.state)(jax.random.key(0))
  step = train.jit_train_step(model, tx, config, shard)
  rng = np.random.default_rng(0)
  batch = jnp.asarray(rng.integers(0, model.cfg.vocab_size,
                                   (config.batch_size, model.cfg.block_size + 1)), jnp.int32)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  ms = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    ms.append(1e3 * (time.perf_counter() - t0))
  realized = {k: float(v) for k, v in metrics.items() if k.startswith('active_')}
  return {'ms': bench_common.stats(ms), 'compile_s': compile_s, 'realized': realized}


def time_decode(model, params, act, policy: str, tokens: int, repeats: int, batch: int,
                active_fraction: float | None = None) -> dict:
  prompt = jnp.ones((batch, 1), jnp.int32)
  knobs = dict(num_tokens=tokens, greedy=True, policy=policy, active_fraction=active_fraction,
               act=None if act is None else ml_collections.FrozenConfigDict(act))
  t0 = time.perf_counter()
  compiled = sample_lib.generate.lower(params, model, prompt, jax.random.key(0), **knobs).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, prompt, jax.random.key(0)))
  ms = bench_common.time_calls(compiled, params, prompt, jax.random.key(0), repeats=repeats)
  _, fractions = compiled(params, prompt, jax.random.key(0))
  return {'ms_per_token': bench_common.stats(np.asarray(ms) / tokens), 'compile_s': compile_s,
          'realized': float(np.mean(fractions))}


def xla_forward_flops(model, params, act, a) -> float | None:
  tokens = jnp.zeros((1, model.cfg.block_size), jnp.int32)
  plan = None if act is None else activation.make_plan(jax.random.key(0), act, model.cfg,
                                                       fraction=a)
  compiled = jax.jit(lambda p, t: model.apply({'params': p}, t, plan=plan)[0]).lower(
      params, tokens).compile()
  flops = bench_common.xla_flops(compiled)
  return None if flops is None else flops / model.cfg.block_size


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  config = bench_common.load_config(_CONFIG.value)
  config.batch_size = _BATCH.value
  config.mesh.data = 1
  cfg = gpt.GPTConfig.from_config(config.model, 65)
  model, tx = gpt.GPT(cfg), runs.make_optimizer(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, cfg.block_size), jnp.int32))['params']
  fractions = [float(a) for a in _FRACTIONS.value]
  buckets = _BUCKETS.value or (4 if cfg.num_heads % 4 == 0 and cfg.mlp_dim % 4 == 0
                               else cfg.num_heads)
  result = {'config': _CONFIG.value, 'model': dict(config.model), 'train_batch': config.batch_size,
            'buckets': buckets, 'decode_batch': _DECODE_BATCH.value,
            'decode_tokens': _DECODE_TOKENS.value,
            **bench_common.environment(), 'points': []}

  def measure(sites, structure, a, act):
    point = {'sites': sites, 'structure': structure, 'active_fraction': a}
    compute = (activation.compute_fractions(act, cfg, a) if act is not None
               else {'mlp': 1.0, 'heads': 1.0, 'layers': 1.0})
    point['flops_per_token'] = flops.flops_per_token(cfg, **compute)
    point['decode_flops_per_token'] = flops.flops_per_token(cfg, decode=True, **compute)
    point['xla_flops_per_token'] = xla_forward_flops(model, params, act, a)
    if not _SKIP_TRAIN.value:
      c = ml_collections.ConfigDict(config.to_dict())
      c.activation = act if act is not None else c.activation
      point['train'] = time_train(c, model, tx, _TRAIN_STEPS.value)
    decode = lambda policy, a=None: time_decode(model, params, act, policy, _DECODE_TOKENS.value,
                                                _DECODE_REPEATS.value, _DECODE_BATCH.value, a)
    point['decode'] = decode('dense' if act is None else 'random')
    point['decode_fixed'] = point['decode'] if act is None else decode('fixed', a)
    print(json.dumps({k: v for k, v in point.items()}), flush=True)
    return point

  dense = measure('none', 'dense', 1.0, None)
  result['points'].append(dense)
  for sites in _SITES.value.split(';'):
    for structure in _STRUCTURES.value:
      for a in fractions:
        act = pinned(config.activation, a)
        act.update(sites=sites, structure=structure, buckets=buckets)
        activation.validate(act, config.model)
        result['points'].append(measure(sites, structure, a, act))

  for p in result['points']:
    p['ideal_speedup'] = dense['flops_per_token'] / p['flops_per_token']
    p['ideal_decode_speedup'] = dense['decode_flops_per_token'] / p['decode_flops_per_token']
    p['decode_speedup'] = (dense['decode']['ms_per_token']['median'] /
                           p['decode']['ms_per_token']['median'])
    p['decode_efficiency'] = p['decode_speedup'] / p['ideal_decode_speedup']
    p['decode_fixed_speedup'] = (dense['decode']['ms_per_token']['median'] /
                                 p['decode_fixed']['ms_per_token']['median'])
    p['decode_fixed_efficiency'] = p['decode_fixed_speedup'] / p['ideal_decode_speedup']
    if 'train' in p:
      p['train_speedup'] = dense['train']['ms']['median'] / p['train']['ms']['median']
      p['train_efficiency'] = p['train_speedup'] / p['ideal_speedup']
  result['peak_host_rss_mib'] = bench_common.peak_rss_mib()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(f'wrote {_OUT.value}')
  for p in result['points']:
    line = (f"{p['sites']:>16} {p['structure']:>9} a={p['active_fraction']:.2f} "
            f"ideal={p['ideal_speedup']:.2f}x decode={p['decode_speedup']:.2f}x "
            f"({p['decode_efficiency']:.0%}) fixed={p['decode_fixed_speedup']:.2f}x "
            f"({p['decode_fixed_efficiency']:.0%})")
    if 'train' in p:
      line += f" train={p['train_speedup']:.2f}x ({p['train_efficiency']:.0%})"
    print(line)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
