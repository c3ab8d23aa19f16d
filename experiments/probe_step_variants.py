"""Which way of writing the model makes XLA's dense train step fastest: one process, variants.

    python experiments/probe_step_variants.py --out=results/gpu/probe_step_variants.json \
        [--config=configs/gpt2_small.py] [--variants=base,einsum,...] [--steps=8] \
        [--batch_size=B --block_size=T --dtype=D]   (on a CPU: 2 x 256, float32 unless given)

A diagnostic for experiments/profile_step.py's findings (on an H100 the GPT-2-small step spent
8.7 of 54 ms of kernel time in transposes of the residual stream, laid out [T, D, B]; the
`posgather` variant here removed them and is now how rag_jax.models.gpt adds the position table,
so `base` below is the model as it was before). Each variant rewrites one
part of the model (module functions patched, or the top-level module subclassed) and is compiled
and timed in this process, in interleaved rounds; the JSON gives per variant the median step, the
count of transpose fusions and copies in the optimised HLO, XLA's bytes accessed, and the loss
after the first step (a rewrite must not change it beyond bfloat16 noise). Variants:
  base       the position table broadcast over the batch (the model before `posgather`)
  einsum     projections as einsums over [B, L, D] (no flattening to [B*L, D])
  onehot     token embedding as one_hot(tokens) @ wte (a matmul; its gradient is one too)
  posgather  position embedding gathered per token ([B, L] indices), not broadcast over the batch
  nopos      no position embedding (diagnostic only: changes the model)
  xla_attn   attention='xla' instead of cuDNN
  tanh       the tanh GELU (cuBLAS-Lt can fuse it into the matmul's epilogue)
Joined with '+' they combine (e.g. `onehot+posgather`).
"""
from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import files
from rag_jax import runs
from rag_jax import sharding
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

_CONFIG = flags.DEFINE_string('config', 'configs/gpt2_small.py', 'Dense config.')
_VARIANTS = flags.DEFINE_list(
    'variants', ['base', 'einsum', 'onehot', 'posgather', 'nopos', 'xla_attn', 'tanh',
                 'onehot+posgather', 'einsum+onehot+posgather'], 'Variants, in order.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps per variant per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Interleaved rounds.')
_BATCH, _BLOCK, _DTYPE = bench_common.define_shape_flags()
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)

VOCAB = 256
OPTS: set[str] = set()  # the variant being built
_ORIG_MATMUL = gpt._matmul  # pylint: disable=protected-access


def _einsum_matmul(x, w, out_dtype=None):
  return jnp.einsum('...d,df->...f', x, w, preferred_element_type=out_dtype)


class ProbeGPT(gpt.GPT):
  """gpt.GPT's training forward with the embedding written as OPTS say (same parameters)."""

  @nn.compact
  def __call__(self, tokens_BxL, *, cache=None, pos=0, deterministic=True, plan=None):
    cfg = self.cfg
    wte_VxD = gpt._param(self, 'wte', gpt._dense_init(cfg), (cfg.vocab_size, cfg.embed_dim))
    wpe_TxD = gpt._param(self, 'wpe', gpt._dense_init(cfg), (cfg.block_size, cfg.embed_dim))
    B, L = tokens_BxL.shape
    if 'onehot' in OPTS:
      tok = jax.nn.one_hot(tokens_BxL, cfg.vocab_size, dtype=cfg.dtype) @ wte_VxD.astype(cfg.dtype)
    else:
      tok = jnp.take(wte_VxD, tokens_BxL, axis=0).astype(cfg.dtype)
    if 'nopos' in OPTS:
      x = tok
    elif 'posgather' in OPTS:
      positions = jnp.broadcast_to(jnp.arange(L), (B, L))
      x = tok + jnp.take(wpe_TxD, positions, axis=0).astype(cfg.dtype)
    else:
      x = tok + wpe_TxD[:L].astype(cfg.dtype)
    x = sharding.shard_batch(x.astype(cfg.dtype))
    for i in range(cfg.num_layers):
      x, _ = gpt.Block(cfg.block(i), name=f'block_{i}')(x, None, pos, deterministic, None)
      x = sharding.shard_batch(x)
    x = nn.LayerNorm(epsilon=gpt.LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype, name='ln_f')(x)
    return gpt._matmul(x, wte_VxD.T.astype(cfg.dtype), jnp.float32), None


def build(variant: str) -> bench_common.TrainStep:
  OPTS.clear()
  OPTS.update(variant.split('+'))
  unknown = OPTS - {'base', 'einsum', 'onehot', 'posgather', 'nopos', 'xla_attn', 'tanh'}
  if unknown:
    raise SystemExit(f'error: unknown variant part(s) {sorted(unknown)}')
  cfg = bench_common.dense_byte_config(_CONFIG.value, _BATCH.value, _BLOCK.value, _DTYPE.value)
  cfg.eval_batch_size = cfg.batch_size
  if 'xla_attn' in OPTS:
    cfg.model.attention = 'xla'
  if 'tanh' in OPTS:
    cfg.model.gelu = 'tanh'
  gpt._matmul = _einsum_matmul if 'einsum' in OPTS else _ORIG_MATMUL
  make_model = runs.make_model
  runs.make_model = lambda c, v: ProbeGPT(gpt.GPTConfig.from_config(c.model, v, dtype=c.dtype))
  try:
    return bench_common.TrainStep(cfg, VOCAB)
  finally:
    runs.make_model = make_model


def hlo_counts(compiled) -> dict:
  text = compiled.as_text()
  entry = text[text.index('\nENTRY'):]
  return {'transpose_fusions': len(re.findall(r'= \S+ fusion\([^\n]*calls=%fused_transpose', entry))
          + len(re.findall(r'\n  %\S*transpose\S* = ', entry)),
          'copies': len(re.findall(r'\n  %copy\S* = ', entry))}


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  steps = {}
  rows = {}
  for v in _VARIANTS.value:
    t0 = time.perf_counter()
    s = build(v)
    s.run(1, record=False)
    rows[v] = {'compile_s': s.compile_s, 'first_loss': float(s.metrics['train_loss']),
               **hlo_counts(s.compiled), 'xla_bytes_accessed': _bytes(s.compiled)}
    steps[v] = s
    print(f'{v}: compiled in {s.compile_s:.1f} s ({time.perf_counter() - t0:.1f} s with init), '
          f'{rows[v]}', file=sys.stderr, flush=True)
  for _ in range(_ROUNDS.value):
    for v, s in steps.items():
      s.run(_STEPS.value)
  base_ms = float(np.median(steps[_VARIANTS.value[0]].ms))
  for v, s in steps.items():
    rows[v]['step_ms'] = bench_common.stats(s.ms)
    rows[v]['vs_first'] = float(np.median(s.ms)) / base_ms
  cfg = steps[_VARIANTS.value[0]].model.cfg
  result = {'config': _CONFIG.value, 'batch_size': int(steps[_VARIANTS.value[0]].batch.shape[0]),
            'block_size': cfg.block_size, 'variants': rows,
            **bench_common.environment()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  for v, r in rows.items():
    print(f"{v:28s} {r['step_ms']['median']:8.2f} ms  {r['vs_first']:.3f}x  transposes "
          f"{r['transpose_fusions']:3d}  copies {r['copies']:3d}  loss {r['first_loss']:.4f}")


def _bytes(compiled):
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('bytes accessed', float('nan')))
  except Exception:  # pylint: disable=broad-except
    return None


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
