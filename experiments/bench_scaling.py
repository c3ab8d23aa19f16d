"""How the cost and the saving grow with model size and context: train step and decode step,
dense and at a = 0.5, on the machine at hand.

    python experiments/bench_scaling.py --out=results/bench_scaling_cpu.json \
        [--sizes=S,M,L] [--contexts=64,256,1024] [--fraction=0.5] [--train_tokens=512]

Sizes (layers x heads x width, MLP 4x width): S 4 x 4 x 128 (the default recipe), M 6 x 6 x 384
(the :gpu recipe), L 12 x 12 x 768 (GPT-2 small's shape, byte vocabulary). Each size runs at
context T = 256; size M also at every `--contexts` length. Per point:
  - train: the step as `python -m rag_jax.train` runs it (bench_common.TrainStep: mesh, sharding,
    `train.jit_train_step`, on the CPU devices of config.mesh.cpu_devices), `--train_tokens`
    tokens per step (batch = train_tokens / T, at least one per device), dense and with every draw
    pinned to
    a (nested mlp and heads; 4 buckets, or one per head where 4 do not divide the heads);
    medians of `--steps` steps after one warm-up;
  - decode: `sample.generate` at batch 1, greedy, a prompt of T/2 tokens then T/2 tokens (one
    cache rebuild included, as experiments/bench_sample.py), ms per token, dense (policy dense)
    and at a (policy fixed: the smaller dense sub-model); medians of `--repeats` runs.
Dense and RA programs of a point are timed in interleaved rounds. float32, random parameters.
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

import bench_common

from rag_jax import cli
from rag_jax import activation
from rag_jax import files
from rag_jax import flops
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import sharding
from rag_jax import workdir as workdir_lib

_SIZES = flags.DEFINE_list('sizes', ['S', 'M', 'L'], 'Model sizes (S, M, L).')
_CONTEXTS = flags.DEFINE_list('contexts', ['64', '256', '1024'], 'Context lengths of size M.')
_FRACTION = flags.DEFINE_float('fraction', 0.5, 'Active fraction of the RA programs.')
_TRAIN_TOKENS = flags.DEFINE_integer('train_tokens', 512, 'Tokens per train step.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed train steps per program and round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Interleaved rounds.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed decode runs per program.')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)

SIZES = {'S': (4, 4, 128), 'M': (6, 6, 384), 'L': (12, 12, 768)}
VOCAB = 256


def point_config(size: str, T: int) -> ml_collections.ConfigDict:
  layers, heads, width = SIZES[size]
  config = bench_common.load_config('configs/shakespeare_char.py')
  config.model.update(num_layers=layers, num_heads=heads, embed_dim=width, mlp_dim=4 * width,
                      block_size=T, dropout=0.0)
  # At least one window per device of the data axis (train splits the batch over them).
  config.batch_size = max(len(jax.devices()), _TRAIN_TOKENS.value // T)
  config.eval_batch_size = config.batch_size
  config.activation.enabled = False
  return config


def ra_activation(config, a: float) -> ml_collections.ConfigDict:
  """Every draw pinned to `a` (bench_common.pinned: size M's 6 heads in sixths)."""
  return bench_common.pinned(config.activation, a, config.model.num_heads)


def decode_program(config, fraction: float | None):
  """A compiled batch-1 generation (dense, or fixed at `fraction`): (a function timing one run
  in ms per token, the compile time)."""
  model = runs.make_model(config, VOCAB)
  params = runs.init_params(model, jax.random.key(0))
  half = config.model.block_size // 2
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, half)), jnp.int32)
  act = ml_collections.FrozenConfigDict(ra_activation(config, fraction or 1.0))
  knobs = dict(num_tokens=half, greedy=True, policy='dense' if fraction is None else 'fixed',
               active_fraction=fraction, act=None if fraction is None else act)
  t0 = time.perf_counter()
  compiled = sample_lib.generate.lower(params, model, prompt, jax.random.key(0), **knobs).compile()
  compile_s = time.perf_counter() - t0
  args = (params, prompt, jax.random.key(0))
  jax.block_until_ready(compiled(*args))  # warm-up
  return (lambda: [t / half for t in bench_common.time_calls(compiled, *args, repeats=1)],
          compile_s)


def measure(size: str, T: int) -> dict:
  a = _FRACTION.value
  config = point_config(size, T)
  ra_config = ml_collections.ConfigDict(config.to_dict())
  ra_config.activation = ra_activation(config, a)
  dense, ra = bench_common.TrainStep(config, VOCAB), bench_common.TrainStep(ra_config, VOCAB)
  dense_decode, dense_decode_compile = decode_program(config, None)
  ra_decode, ra_decode_compile = decode_program(config, a)
  decode = {'dense': [], 'ra': []}
  for _ in range(_ROUNDS.value):
    dense.run(_STEPS.value)
    ra.run(_STEPS.value)
  for _ in range(_REPEATS.value):
    decode['dense'] += dense_decode()
    decode['ra'] += ra_decode()
  cfg = dense.model.cfg
  compute = activation.compute_fractions(ra_config.activation, cfg, a)
  ideal = flops.flops_per_token(cfg) / flops.flops_per_token(cfg, **compute)
  train_ms = {'dense': bench_common.stats(dense.ms), 'ra': bench_common.stats(ra.ms)}
  decode_stats = {k: bench_common.stats(v) for k, v in decode.items()}
  speed = lambda d: d['dense']['median'] / d['ra']['median']
  return {
      'size': size, 'layers': cfg.num_layers, 'heads': cfg.num_heads, 'width': cfg.embed_dim,
      'context': T, 'num_params': dense.num_params, 'train_batch': config.batch_size,
      'flops_per_token': flops.flops_per_token(cfg), 'active_fraction': a,
      'ideal_speedup': ideal,
      'train_ms': train_ms, 'train_speedup': speed(train_ms),
      'train_efficiency': speed(train_ms) / ideal,
      'decode_ms_per_token': decode_stats, 'decode_speedup': speed(decode_stats),
      'decode_efficiency': speed(decode_stats) / ideal,
      'compile_s': {'train_dense': dense.compile_s, 'train_ra': ra.compile_s,
                    'decode_dense': dense_decode_compile, 'decode_ra': ra_decode_compile},
  }


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  config = bench_common.load_config('configs/shakespeare_char.py')
  config.batch_size = config.eval_batch_size = _TRAIN_TOKENS.value // 256
  sharding.set_cpu_devices(config)  # as `python -m rag_jax.train` does
  points = [(s, 256) for s in _SIZES.value]
  if 'M' in _SIZES.value:
    points += [('M', int(t)) for t in _CONTEXTS.value if int(t) != 256]
  results = []
  for size, T in points:
    r = measure(size, T)
    results.append(r)
    print(f"{size} T={T}: train {r['train_ms']['dense']['median']:.1f} -> "
          f"{r['train_ms']['ra']['median']:.1f} ms ({r['train_speedup']:.2f}x, ideal "
          f"{r['ideal_speedup']:.2f}x); decode {r['decode_ms_per_token']['dense']['median']:.2f} "
          f"-> {r['decode_ms_per_token']['ra']['median']:.2f} ms/token "
          f"({r['decode_speedup']:.2f}x)", file=sys.stderr, flush=True)
  result = {'fraction': _FRACTION.value, 'train_tokens': _TRAIN_TOKENS.value,
            'devices_in_mesh': len(jax.devices()), **bench_common.environment(),
            'points': results, 'load_average_1_5_15min_at_end': os.getloadavg(),
            'peak_host_rss_mib': bench_common.peak_rss_mib()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
