"""Steady-state train-step benchmark, built exactly as `rag_jax.train` builds its step.

    python experiments/bench_train.py --config=configs/shakespeare_char.py[:ARG] \
        [--config.FIELD=VALUE ...] [--steps=100] [--warmup=10] [--feed] [--parts] --out=FILE.json

Times each step with `block_until_ready` and writes one JSON object: median/p10/p90 step time,
tokens/s, compile time, peak host memory, XLA's FLOP count of the compiled step, versions and
XLA_FLAGS. Step timings:
  - `step_fresh_ms`: a fresh batch each step, `data.train_batch` + `device_put` + step, as the
    training loop does (the headline number);
  - `step_fixed_ms` (with --feed): the step alone on one pre-placed batch;
  - `feed_ms` (with --feed): `data.train_batch` + `device_put` alone;
  - `pipelined_ms_per_step`: fresh batches with no sync between steps (what `train.py`'s loop,
    which dispatches asynchronously, sees), total time / steps.
The variants run interleaved in rounds so that load from other processes hits them alike.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import bench_common

from rag_jax import cli
from rag_jax import configuration
from rag_jax.data import pipeline as data_lib
from rag_jax import files
from rag_jax import runs
from rag_jax import sharding
from rag_jax import train
from rag_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 100, 'Timed steps per variant.')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed steps after compilation.')
_ROUNDS = flags.DEFINE_integer('rounds', 5,
                               'Timed steps are split into this many interleaved rounds.')
_FEED = flags.DEFINE_bool('feed', True,
                          'Also time input feeding alone and the step on a fixed batch.')
_PARTS = flags.DEFINE_bool(
    'parts', False, 'Also time the pieces of a step alone: forward loss, gradient, optimizer '
    'update, and one layer\'s attention forward+backward (jax.nn.dot_product_attention against '
    'a plain einsum/softmax version), to see where the step time goes.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON result (also printed).')


def benchmark(config, steps: int, warmup: int, rounds: int, feed: bool) -> dict:
  configuration.validate(config)
  mesh = sharding.make_mesh(config)
  dataset = data_lib.load(config, splits=('train',))
  model = runs.make_model(config, dataset.tokenizer.vocab_size)
  tx = runs.make_optimizer(config)
  keys = workdir_lib.root_keys(config.seed)
  init_fn = functools.partial(runs.init_state, model, tx, config=config)
  shard = sharding.Shardings.of(mesh, jax.eval_shape(init_fn, keys['init']))
  state = jax.jit(init_fn, out_shardings=shard.state)(keys['init'])
  train_step = train.jit_train_step(model, tx, config, shard)
  batch_sharding = shard.batch
  tokens, B, T = dataset.splits['train'], config.batch_size, config.model.block_size
  step_no = 0

  def fresh_batch():
    nonlocal step_no
    step_no += 1
    return jax.device_put(data_lib.train_batch(tokens, B, T, config.seed, step_no - 1),
                          batch_sharding)

  result = {}
  with jax.set_mesh(mesh):
    batch0 = fresh_batch()
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch0, keys['train'])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result.update(trace_lower_s=t1 - t0, compile_s=t2 - t1,
                  flops_per_step=bench_common.xla_flops(compiled))
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch0, keys['train'])  # jit's own compile, if not cached.
    jax.block_until_ready((state, metrics))
    result['first_call_s'] = time.perf_counter() - t0
    first_loss = float(metrics['train_loss'])
    for _ in range(warmup):
      state, metrics = train_step(state, fresh_batch(), keys['train'])
    jax.block_until_ready((state, metrics))

    fixed = fresh_batch()
    times = {'step_fresh_ms': [], 'pipelined_ms_per_step': []}
    if feed:
      times.update(step_fixed_ms=[], feed_ms=[])
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
      for _ in range(per_round):  # fresh batch each step, synchronous.
        t0 = time.perf_counter()
        state, metrics = train_step(state, fresh_batch(), keys['train'])
        jax.block_until_ready((state, metrics))
        times['step_fresh_ms'].append(1e3 * (time.perf_counter() - t0))
      t0 = time.perf_counter()  # fresh batches, asynchronous dispatch as in train.py.
      for _ in range(per_round):
        state, metrics = train_step(state, fresh_batch(), keys['train'])
      jax.block_until_ready((state, metrics))
      times['pipelined_ms_per_step'].append(1e3 * (time.perf_counter() - t0) / per_round)
      if not feed:
        continue
      for _ in range(per_round):  # the step alone on a pre-placed batch.
        t0 = time.perf_counter()
        state, metrics = train_step(state, fixed, keys['train'])
        jax.block_until_ready((state, metrics))
        times['step_fixed_ms'].append(1e3 * (time.perf_counter() - t0))
      for _ in range(per_round):  # input feeding alone.
        t0 = time.perf_counter()
        jax.block_until_ready(fresh_batch())
        times['feed_ms'].append(1e3 * (time.perf_counter() - t0))
    last_loss = float(metrics['train_loss'])

  stats = {k: bench_common.stats(v) for k, v in times.items()}
  result.update(
      step_ms=stats['step_fresh_ms'], timings=stats,
      tokens_per_sec=B * T / (stats['step_fresh_ms']['median'] / 1e3),
      tokens_per_sec_pipelined=B * T / (stats['pipelined_ms_per_step']['median'] / 1e3),
      # last_loss follows warmup + all timed steps, including those repeating the fixed batch.
      first_loss=first_loss, last_loss=last_loss, steps_run=step_no)
  return result


def time_parts(config, repeats: int = 50) -> dict:
  """Medians (ms) of the pieces of a step, each jitted and timed alone on one random batch."""
  model = runs.make_model(config, 65)
  tx = runs.make_optimizer(config)
  state = runs.init_state(model, tx, jax.random.key(0), config)
  B, T = config.batch_size, config.model.block_size
  batch = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 65)
  loss = lambda p, b: train.loss_fn(p, model, b, None)
  grads = jax.jit(jax.grad(loss))(state.params, batch)
  H, K = config.model.num_heads, config.model.embed_dim // config.model.num_heads
  q = jax.random.normal(jax.random.key(2), (B, T, H, K))

  def einsum_attention(q, k, v):
    s = jnp.einsum('BLHK,BSHK->BHLS', q, k) * K ** -0.5
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return jnp.einsum('BHLS,BSHK->BLHK', jax.nn.softmax(s, axis=-1), v)

  def attention_grad(attend):
    return jax.grad(lambda q: jnp.sum(attend(q, 2 * q, 3 * q) * q))

  pieces = {
      'forward_loss': (loss, state.params, batch),
      'gradient': (jax.grad(loss), state.params, batch),
      'optimizer_update': (lambda g, s: tx.update(g, s.opt_state, s.params), grads, state),
      'train_step': (lambda s, b: train.make_train_step(model, tx, config.activation)(
          s, b, jax.random.key(0)), state, batch),
      'attention_fwd_bwd_one_layer': (attention_grad(
          lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), q),
      'einsum_attention_fwd_bwd_one_layer': (attention_grad(einsum_attention), q),
  }
  out = {}
  for name, (fn, *args) in pieces.items():
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    out[name] = bench_common.stats(bench_common.time_calls(fn, *args, repeats=repeats))['median']
  return out


def main(argv):
  workdir_lib.quiet_logs()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  sharding.set_cpu_devices(config)  # as `python -m rag_jax.train` does
  result = {
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'overrides': {k: str(v) for k, v in
                    config_flags.get_override_values(flags.FLAGS['config']).items()},
      'model': dict(config.model), 'batch_size': config.batch_size,
      'devices_in_mesh': len(jax.devices()),
      'matmul_precision': str(jax.config.jax_default_matmul_precision),
      **bench_common.environment(),
  }
  try:
    result.update(benchmark(config, _STEPS.value, _WARMUP.value, _ROUNDS.value, _FEED.value))
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  if _PARTS.value:
    result['parts_ms'] = time_parts(config)
  result['peak_host_rss_mib'] = bench_common.peak_rss_mib()
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    files.write_json(_OUT.value, result)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=cli.parse_flags_with_output)
