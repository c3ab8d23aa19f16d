"""One decode query's attention over a cache: dot products against a multiply-and-reduce.

    .venv/bin/python experiments/attention_step.py --workdir=RUN \
        --out=results/attention_step_cpu.json

`isolated`: four layers' attention of one query per row over a B x S x h x K cache (half of it
valid), jitted with the decoders' compiler options, interleaved for `--rounds` rounds, at the
shapes of this project's models and slot counts: the model's `attention.attend_step` (two dot
products batched over rows and heads) against `multiply_reduce` (the earlier implementation:
products and sums over the same layout, kept here as the reference), checked equal. `engine`:
ms per step of the slot engine on the trained run `--workdir` (greedy, every slot live, 8
steps per call) with each implementation swapped in, interleaved for `--rounds` rounds.
Medians.
"""
from __future__ import annotations

import functools
import math
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import decode
from rag_jax import files
from rag_jax import runs
from rag_jax import workdir as workdir_lib
from rag_jax.models import attention
from rag_jax.models import switch

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run (the engine part).',
                               required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds of each measurement.')

SHAPES = ((1, 64, 4, 32), (4, 64, 4, 32), (16, 64, 4, 32),  # the default model: rows, S, h, K
          (1, 128, 4, 16), (16, 128, 4, 16),                 # the capacity recipe
          (1, 256, 6, 64), (8, 256, 6, 64))                  # the :gpu model


def multiply_reduce(q_Bx1xhxK, k_BxSxhxK, v_BxSxhxK, mask_S, k_Bx1xhxK, v_Bx1xhxK):
  """The earlier attend_step: products and sums over the cache's layout."""
  f32 = jnp.float32
  q_Bx1xhxK = q_Bx1xhxK.astype(f32) * (1 / math.sqrt(q_Bx1xhxK.shape[-1]))
  s_BxSxh = jnp.sum(q_Bx1xhxK * k_BxSxhxK.astype(f32), axis=-1)
  s_BxSxh = jnp.where(mask_S[None, :, None], s_BxSxh, jnp.finfo(f32).min)
  s_Bx1xh = jnp.sum(q_Bx1xhxK * k_Bx1xhxK.astype(f32), axis=-1)
  m_Bx1xh = jnp.maximum(jnp.max(s_BxSxh, axis=1, keepdims=True), s_Bx1xh)
  p_BxSxh, p_Bx1xh = jnp.exp(s_BxSxh - m_Bx1xh), jnp.exp(s_Bx1xh - m_Bx1xh)
  o_Bxhxk = (jnp.sum(p_BxSxh[..., None] * v_BxSxhxK.astype(f32), axis=1)
             + p_Bx1xh[:, 0, :, None] * v_Bx1xhxK[:, 0].astype(f32))
  o_Bxhxk = o_Bxhxk / (jnp.sum(p_BxSxh, axis=1) + p_Bx1xh[:, 0])[..., None]
  return switch.save(o_Bxhxk[:, None].astype(v_BxSxhxK.dtype))


IMPLEMENTATIONS = {'dot_products': attention.attend_step, 'multiply_reduce': multiply_reduce}


def median_ms(fn, calls: int, repeats: int = 7) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    times.append(1e3 * (time.perf_counter() - start) / calls)
  return float(np.median(times))


def isolated(shape) -> dict:
  B, S, h, K = shape
  jit = functools.partial(jax.jit, compiler_options=decode.compiler_options())
  q = jax.random.normal(jax.random.key(0), (B, 1, h, K))
  k = jax.random.normal(jax.random.key(1), (B, S, h, K))
  v = jax.random.normal(jax.random.key(2), (B, S, h, K))
  mask = jnp.arange(S) < S // 2
  programs, outputs = {}, {}
  for name, fn in IMPLEMENTATIONS.items():
    programs[name] = jit(lambda q, k, v, fn=fn: [fn(q * (i + 1), k, v, mask, q, q)
                                                 for i in range(4)])
    outputs[name] = np.asarray(programs[name](q, k, v)[0])
  times = {name: [] for name in programs}
  for _ in range(_ROUNDS.value):  # interleaved, as the engine's
    for name, layers in programs.items():
      times[name].append(median_ms(lambda layers=layers: layers(q, k, v), 300))
  out = {name: float(np.median(t)) for name, t in times.items()}
  np.testing.assert_allclose(outputs['dot_products'], outputs['multiply_reduce'], rtol=1e-4,
                             atol=1e-5)
  out['speedup'] = out['multiply_reduce'] / out['dot_products']
  return out


def engine_ms(run, slots: int) -> float:
  _, call = bench_common.engine_decoding(run, slots, 8)
  return median_ms(call, 32, 5) / 8


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  result = {'command': ' '.join(sys.argv), 'isolated': {}, 'engine': {}}
  for shape in SHAPES:
    r = result['isolated'][','.join(map(str, shape))] = isolated(shape)
    print(f"rows, S, h, K = {shape}: dot products {r['dot_products']:.3f} ms, multiply-reduce "
          f"{r['multiply_reduce']:.3f} ms ({r['speedup']:.2f}x)")
  run = runs.load_run(_WORKDIR.value)
  times = {(name, s): [] for name in IMPLEMENTATIONS for s in (1, 16)}
  try:
    for _ in range(_ROUNDS.value):
      for name, fn in IMPLEMENTATIONS.items():
        attention.attend_step = fn  # each Engine traces its programs afresh
        for slots in (1, 16):
          times[name, slots].append(engine_ms(run, slots))
  finally:
    attention.attend_step = IMPLEMENTATIONS['dot_products']
  for (name, slots), ms in times.items():
    result['engine'][f'{name}_slots{slots}'] = {'ms_per_step': float(np.median(ms)), 'all': ms}
  for slots in (1, 16):
    e = result['engine']
    print(f'engine, {slots} slots: dot products '
          f"{e[f'dot_products_slots{slots}']['ms_per_step']:.3f} ms, multiply-reduce "
          f"{e[f'multiply_reduce_slots{slots}']['ms_per_step']:.3f} ms per step")
  files.write_json(_OUT.value, result)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
