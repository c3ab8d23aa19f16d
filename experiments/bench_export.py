"""Exported sub-models against their parent: parameters, bytes, loss and decode speed.

    python experiments/bench_export.py --workdir=W --out=results/export/bench_export.json \
        [--fractions=1,0.75,0.5,0.25] [--split=validation] [--num_tokens=128] [--repeats=7]

For each fraction a: `rag_jax.export` of W's newest checkpoint (float32, and --int8) into
--export_dir; the validation loss of each export against W's own `evaluate --active_fractions=a`;
the export's parameters and bytes on disk against W's; greedy decode of the float32 export
(policy dense) against W's fixed-width decode at a (the compiled sampler, `sample.generate`):
a prompt of T/2 tokens, `num_tokens` generated (a multiple of T/2, cache rebuilds included),
medians over `repeats` calls interleaved over the programs, compilation excluded. int8 exports
are dequantized when loaded, so they decode at the float32 export's speed (not timed again).
"""
from __future__ import annotations

import os
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import evaluate
from rag_jax import export
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_FRACTIONS = flags.DEFINE_list('fractions', ['1', '0.75', '0.5', '0.25'], 'Fractions to export.')
_SPLIT = flags.DEFINE_string('split', 'validation', 'Split to score.')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', 128, 'Tokens per timed decode (multiple of T/2).')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed decodes per program.')
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'Where the exports go (default: a '
                                  'temporary directory).')


def _decoder(run, policy, fraction, prompt, num_tokens):
  knobs = dict(num_tokens=num_tokens, greedy=True, policy=policy, active_fraction=fraction,
               act=None if policy == 'dense' else ml_collections.FrozenConfigDict(
                   run.config.activation))
  key = jax.random.key(0)
  compiled = sample_lib.generate.lower(run.params, run.model, prompt, key, **knobs).compile()
  args = (run.params, prompt, key)
  tokens = jax.device_get(compiled(*args))[0]  # warm-up
  return {'compiled': compiled, 'args': args, 'tokens': np.asarray(tokens), 'ms': []}


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  fractions = [float(a) for a in _FRACTIONS.value]
  export_dir = _EXPORT_DIR.value or tempfile.mkdtemp(prefix='rag_export_')
  parent = runs.load_run(_WORKDIR.value)
  parent_loss = {e['active_fraction']: e for e in
                 evaluate.evaluate(_WORKDIR.value, fractions, split=_SPLIT.value)}
  T = parent.model.cfg.block_size
  prompt = jnp.asarray(np.random.default_rng(0).integers(
      0, parent.tokenizer.vocab_size, (1, T // 2)), jnp.int32)
  rows, decoders = [], {}
  for a in fractions:
    row = {'active_fraction': a, 'parent_loss': parent_loss[a]['loss'],
           'parent_flops_per_token': parent_loss[a]['flops_per_token']}
    for int8 in (False, True):
      out = os.path.join(export_dir, f'a{a:g}' + ('_int8' if int8 else ''))
      record = export.export(_WORKDIR.value, a, out, int8=int8)
      (entry,) = evaluate.evaluate(out, (1.0,), split=_SPLIT.value)
      tag = 'int8' if int8 else 'float32'
      row.update({f'{tag}_loss': entry['loss'], f'{tag}_bytes': record['bytes']})
      row.update(parameters=record['parameters'], parent_parameters=record['parent_parameters'],
                 model=record['model'], export_flops_per_token=entry['flops_per_token'])
      if not int8:
        decoders[('export', a)] = _decoder(runs.load_run(out), 'dense', None, prompt,
                                           _NUM_TOKENS.value)
    decoders[('parent', a)] = _decoder(parent, 'dense' if a == 1 else 'fixed',
                                       None if a == 1 else a, prompt, _NUM_TOKENS.value)
    rows.append(row)
    print(row, flush=True)
  for _ in range(_REPEATS.value):  # interleaved, so that other load touches all alike
    for d in decoders.values():
      d['ms'] += bench_common.time_calls(d['compiled'], *d['args'], repeats=1)
  parent_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, fs in os.walk(
      os.path.join(_WORKDIR.value, 'checkpoints', str(parent.step))) for f in fs)
  for row in rows:
    a = row['active_fraction']
    ms = {k: np.median(decoders[(k, a)]['ms']) / _NUM_TOKENS.value for k in ('parent', 'export')}
    row.update(
        loss_difference=row['float32_loss'] - row['parent_loss'],
        int8_loss_ratio=row['int8_loss'] / row['parent_loss'],
        parameter_fraction=row['parameters'] / row['parent_parameters'],
        bytes_per_parameter_float32=row['float32_bytes'] / row['parameters'],
        int8_bytes_vs_float32=row['int8_bytes'] / row['float32_bytes'],
        parent_decode_ms_per_token=float(ms['parent']),
        export_decode_ms_per_token=float(ms['export']),
        export_decode_speedup=float(ms['parent'] / ms['export']),
        same_greedy_tokens=bool(np.array_equal(decoders[('parent', a)]['tokens'],
                                               decoders[('export', a)]['tokens'])))
  result = {'workdir': os.path.abspath(_WORKDIR.value), 'step': parent.step,
            'model': dict(parent.config.model), 'activation': parent.config.activation.to_dict(),
            'split': _SPLIT.value, 'num_tokens': _NUM_TOKENS.value, 'repeats': _REPEATS.value,
            'parent_checkpoint_bytes_with_optimizer': parent_bytes,
            **bench_common.environment(), 'rows': rows}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(f'wrote {_OUT.value}')
  print(f"{'a':>5} {'params':>8} {'frac':>5} {'f32 bytes':>9} {'int8 bytes':>10} "
        f"{'parent loss':>11} {'export-parent':>13} {'int8/parent':>11} {'decode x':>8}")
  for r in rows:
    print(f"{r['active_fraction']:>5.2f} {r['parameters']:>8} {r['parameter_fraction']:>5.3f} "
          f"{r['float32_bytes']:>9} {r['int8_bytes']:>10} {r['parent_loss']:>11.4f} "
          f"{r['loss_difference']:>13.2e} {r['int8_loss_ratio']:>11.4f} "
          f"{r['export_decode_speedup']:>8.2f}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
