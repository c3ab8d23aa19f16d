"""Model FLOPs utilisation of dense training, and the train-step speedup of RA at a = 0.5.

    python experiments/bench_mfu.py --out=results/bench_mfu_cpu.json \
        [--config=configs/gpt2_small.py] [--batch_size=B --block_size=T --dtype=D] \
        [--steps=5] [--peak_flops=F] [--fraction=0.5]

The train step is built as `rag_jax.train` builds it (mesh and shardings from the config, a
sharded jitted init, `jit_train_step`), on random tokens of the byte vocabulary (no dataset).
  - tokens/s: batch x context / median step time, the steps dispatched back to back with one
    `block_until_ready` per window of `--steps` (as `rag_jax.train` runs them between two log
    steps: the host's launch of step n+1 overlaps the device's step n). The synchronous time
    (`block_until_ready` after every step, which adds the host's part to each step) is recorded
    beside it (`step_ms`, `mfu_synchronous`); on a CPU the two agree.
  - model FLOPs per token: 6 N + 12 L D T (PaLM's count, also nanoGPT's estimate_mfu): N the
    parameters that enter matrix products (all but the position table; the tied embedding
    counts once, as the output head), and the attention scores and values over the whole
    context T, forward and backward. XLA's own count of the compiled step is recorded beside it.
  - MFU: model FLOPs per second / the chip's peak. GPUs and TPUs: the vendor's dense bfloat16
    peak by device kind (PEAK_FLOPS). CPU: no such figure; the peak is measured here as the
    float32 throughput of a large jitted matmul (`peak_source` says which), or `--peak_flops`.
  - RA: the same step with every draw pinned to a = `--fraction` (lam = 1, B ~ Beta(1000,
    0.001) = 1, min_active = a; mlp and heads, nested, 4 buckets), timed in rounds interleaved
    with the dense step; the speedup is dense ms / RA ms (pipelined, and synchronous beside it),
    against the ideal FLOPs ratio.
On a CPU the defaults shrink the run (batch 2, context 256, float32, 3 timed steps per round)
so it ends in minutes; on an accelerator they are the config's (32 x 1024, bfloat16).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections

import bench_common

from rag_jax import cli
from rag_jax import activation
from rag_jax import files
from rag_jax import flops
from rag_jax import workdir as workdir_lib
from rag_jax.models import attention
from rag_jax.models import gpt

_CONFIG = flags.DEFINE_string('config', 'configs/gpt2_small.py', 'Config (dense; RA is derived).')
_BATCH, _BLOCK, _DTYPE = bench_common.define_shape_flags()
_STEPS = flags.DEFINE_integer('steps', 0,
                              'Timed steps per variant and round; 0: 3 on CPU, 10 else.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Interleaved rounds of dense and RA steps.')
_FRACTION = flags.DEFINE_float('fraction', 0.5, 'Active fraction of the RA step; 0: dense only.')
_PEAK = flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s of one device; 0: table or measure.')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)

VOCAB = 256  # the byte tokenizer of configs/gpt2_small.py
# Dense bfloat16 peak FLOP/s per device from the vendors' data sheets (without sparsity).
PEAK_FLOPS = {'H100 80GB HBM3': 989e12, 'H100 SXM': 989e12, 'H100 PCIe': 756e12, 'H200': 989e12,
              'A100': 312e12, 'L4': 121e12, 'A10G': 125e12, 'T4': 65e12, 'TPU v4': 275e12,
              'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
              'TPU v6e': 918e12}


def model_flops_per_token(cfg: gpt.GPTConfig, num_params: int) -> float:
  """6 N + 12 L D T: N without the position table (no matmul reads it)."""
  n = num_params - cfg.block_size * cfg.embed_dim
  return 6.0 * n + 12.0 * cfg.num_layers * cfg.embed_dim * cfg.block_size


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n x n float32 matmul on the default device, best of `repeats`."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = min(bench_common.time_calls(f, a, repeats=repeats))
  return 2 * n ** 3 / (best / 1e3)


def device_peak() -> tuple[float | None, str]:
  if _PEAK.value:
    return _PEAK.value, '--peak_flops'
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak, f'vendor dense bf16 peak for {name!r}'
  if jax.devices()[0].platform == 'cpu':
    return measured_matmul_peak(), 'measured: float32 2048^3 jitted matmul on this CPU (all cores)'
  return None, f'unknown device kind {kind!r}: pass --peak_flops'


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  on_cpu = jax.devices()[0].platform == 'cpu'
  config = bench_common.dense_byte_config(_CONFIG.value, _BATCH.value, _BLOCK.value, _DTYPE.value)
  mesh_ways = len(jax.devices())
  config.eval_batch_size = config.batch_size
  steps = _STEPS.value or (3 if on_cpu else 10)
  B, T = config.batch_size, config.model.block_size

  dense = bench_common.TrainStep(config, VOCAB)
  ra = None
  if _FRACTION.value:
    ra_config = ml_collections.ConfigDict(config.to_dict())
    ra_config.activation = bench_common.pinned(config.activation, _FRACTION.value,
                                                config.model.num_heads)
    activation.validate(ra_config.activation, ra_config.model)
    ra = bench_common.TrainStep(ra_config, VOCAB)
  for _ in range(_ROUNDS.value):  # interleaved, so that load from other processes hits both
    for step in (dense, ra) if ra else (dense,):
      step.run(steps)
      step.run_pipelined(steps)

  cfg = dense.model.cfg
  peak, peak_source = device_peak()
  dense_ms = bench_common.stats(dense.pipelined_ms)
  sync_ms = bench_common.stats(dense.ms)
  tokens_per_sec = B * T / (dense_ms['median'] / 1e3)
  flops_token = model_flops_per_token(cfg, dense.num_params)
  achieved = flops_token * tokens_per_sec
  mfu = lambda ms: None if peak is None else flops_token * B * T / (ms / 1e3) / (peak * mesh_ways)
  result = {
      'config': _CONFIG.value, 'model': dict(config.model), 'batch_size': B, 'context': T,
      'dtype': config.dtype,
      'attention': attention.implementation(cfg.attention, cfg.head_dim, config.dtype, causal=True),
      'devices_in_mesh': mesh_ways, 'num_params': dense.num_params, **bench_common.environment(),
      'dense': {
          'pipelined_step_ms': dense_ms, 'step_ms': sync_ms, 'compile_s': dense.compile_s,
          'tokens_per_sec': tokens_per_sec,
          'model_flops_per_token': flops_token,
          # XLA's count of the compiled step (per device when the mesh has several).
          'xla_flops_per_step': dense.xla_flops,
          'model_flops_per_sec': achieved,
          'peak_flops_per_device': peak, 'peak_source': peak_source,
          'mfu': mfu(dense_ms['median']), 'mfu_synchronous': mfu(sync_ms['median']),
          'last_loss': float(dense.metrics['train_loss'])},
  }
  if ra:
    ra_ms, ra_sync_ms = bench_common.stats(ra.pipelined_ms), bench_common.stats(ra.ms)
    compute = activation.compute_fractions(ra_config.activation, cfg, _FRACTION.value)
    result['ra'] = {
        'active_fraction': _FRACTION.value,
        'realized': {k: float(v) for k, v in ra.metrics.items() if k.startswith('active_')},
        'pipelined_step_ms': ra_ms, 'step_ms': ra_sync_ms, 'compile_s': ra.compile_s,
        'speedup_vs_dense': dense_ms['median'] / ra_ms['median'],
        'speedup_vs_dense_synchronous': sync_ms['median'] / ra_sync_ms['median'],
        'ideal_speedup': flops.flops_per_token(cfg) / flops.flops_per_token(cfg, **compute),
        'last_loss': float(ra.metrics['train_loss'])}
  if on_cpu:
    result['gpu'] = {'status': 'not measured',
                     'reason': 'no GPU in the session that ran this; run this script on one'}
  result['load_average_1_5_15min_at_end'] = os.getloadavg()  # other processes on the host
  result['peak_host_rss_mib'] = bench_common.peak_rss_mib()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(json.dumps(result, indent=2))
  d, r = result['dense'], result.get('ra')
  pct = lambda x: 'n/a' if x is None else f'{x:.1%}'
  ra_line = (f"; RA a={r['active_fraction']}: {r['speedup_vs_dense']:.2f}x, synchronous "
             f"{r['speedup_vs_dense_synchronous']:.2f}x (ideal {r['ideal_speedup']:.2f}x)"
             if r else '')
  print(f"dense: {d['tokens_per_sec']:.0f} tokens/s, {d['model_flops_per_sec'] / 1e9:.1f} "
        f"GFLOP/s, MFU {pct(d['mfu'])}, synchronous {pct(d['mfu_synchronous'])} "
        f"({peak_source}){ra_line}", file=sys.stderr)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
