"""Random activation from a dense model: fine-tuning against training from scratch.

    python experiments/finetune_ra.py --out_dir=runs/finetune_ra --seeds=0,1,2 \
        --out=results/finetune_ra/finetune_ra.json

Per seed, in OUT_DIR/seed_S/ (each step skipped when its workdir is already complete):

  dense            configs/shakespeare_char.py, trained from scratch (2000 steps)
  ra_scratch       configs/ra_shakespeare_char.py, from scratch (2000 steps)
  ft_N[_reorder]   the RA config started from dense's parameters (`config.init_from`), with or
                   without first ordering every layer's MLP units and heads by importance
                   (`config.init_reorder`, rag_jax/reorder.py), trained N steps (N = a quarter
                   and a half of the from-scratch steps: 500, 1000) with the same recipe on
                   its own N-step schedule
  dense_reordered  dense's parameters reordered, no training (an export-format directory):
                   what reordering alone does to the truncated dense model

Each is scored on the validation split at a = 1, 0.75, 0.5, 0.25 (`evaluate`: nested widths of
MLP units and heads; for the dense models, the truncated dense model). The JSON holds every
entry, the mean and spread over seeds, and the training steps each variant cost.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
import ml_collections
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax.data import pipeline as data_lib
from rag_jax import evaluate
from rag_jax import files
from rag_jax import runs
from rag_jax import train
from rag_jax import weights
from rag_jax import workdir as workdir_lib
from rag_jax.data import tokenizers

_OUT_DIR = flags.DEFINE_string('out_dir', 'runs/finetune_ra', 'Workdirs of the runs.')
_OUT = flags.DEFINE_string('out', 'results/finetune_ra/finetune_ra.json', 'JSON output.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed) of the whole family.')
_STEPS = flags.DEFINE_list('finetune_steps', ['500', '1000'], 'Fine-tuning steps.')
_ARG = flags.DEFINE_string('arg', '', "Config variant ('' or 'smoke').")
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir (default: $TFDS_DATA_DIR).')

FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def _config(name: str, seed: int):
  config = bench_common.load_config(f'configs/{name}.py' + (f':{_ARG.value}' if _ARG.value else ''))
  config.seed = seed
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  return config


def _scored(workdir: str) -> bool:
  path = os.path.join(workdir, 'eval_curve.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    have = {(e['active_fraction'], e['split']) for e in json.load(f) if e['policy'] == 'fixed'}
  return all((a, 'validation') in have for a in FRACTIONS)


def _score(workdir: str, config=None) -> list[dict]:
  """The workdir's validation entries at FRACTIONS; trains it first (with `config`) and scores
  it where they are missing (an export-format directory is scored only)."""
  if not _scored(workdir):
    print(f'== {workdir}', file=sys.stderr, flush=True)
    if config is not None:
      train.train_and_evaluate(config, workdir)
    evaluate.evaluate(workdir, FRACTIONS, split='validation')
  with open(os.path.join(workdir, 'eval_curve.json')) as f:
    entries = [e for e in json.load(f) if e['policy'] == 'fixed' and e['split'] == 'validation']
  return [{'active_fraction': e['active_fraction'], 'loss': e['loss'],
           'flops_per_token': e['flops_per_token']} for e in entries]


def _write_reordered(dense: str, out: str, config) -> None:
  """dense's parameters with units and heads by importance, as an export-format directory."""
  if weights.is_export(out):
    return
  run = runs.load_run(dense)
  dataset = data_lib.load(run.config, run.tokenizer, ('train',))
  config = ml_collections.ConfigDict(config.to_dict())
  config.init_from = dense
  params = train.reordered(run, dataset, config).params
  workdir_lib.check_writable(out, create=True)
  weights.save(params, out)
  workdir_lib.save_config(run.config, out)
  tokenizers.save(run.tokenizer, os.path.join(out, workdir_lib.TOKENIZER_FILE))
  files.write_json(os.path.join(out, weights.EXPORT_FILE),
                   {'parent': os.path.abspath(dense), 'step': int(run.step),
                    'active_fraction': 1.0, 'int8': False, 'reordered': True})


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  results = {}
  train_steps = {}
  for seed in map(int, _SEEDS.value):
    base = os.path.join(_OUT_DIR.value, f'seed_{seed}')
    dense = os.path.join(base, 'dense')
    variants = {'dense': (_config('shakespeare_char', seed), dense),
                'ra_scratch': (_config('ra_shakespeare_char', seed),
                               os.path.join(base, 'ra_scratch'))}
    for n in map(int, _STEPS.value):
      for order in (False, True):
        config = _config('ra_shakespeare_char', seed)
        config.update(init_from=dense, init_reorder=order, num_steps=n,
                      eval_every=min(config.eval_every, n),
                      checkpoint_every=min(config.checkpoint_every, n))
        config.opt.warmup_steps = min(config.opt.warmup_steps, n // 10)
        variants[f'ft_{n}' + ('_reorder' if order else '')] = (
            config, os.path.join(base, f'ft_{n}' + ('_reorder' if order else '')))
    for name, (config, workdir) in variants.items():
      results.setdefault(name, {})[seed] = _score(workdir, config)
      train_steps[name] = config.num_steps
    reordered = os.path.join(base, 'dense_reordered')
    _write_reordered(dense, reordered, variants['dense'][0])
    results.setdefault('dense_reordered', {})[seed] = _score(reordered)
    train_steps['dense_reordered'] = 0

  table = {}
  for name, by_seed in results.items():
    table[name] = {}
    for a in FRACTIONS:
      losses = [next(e['loss'] for e in entries if abs(e['active_fraction'] - a) < 1e-6)
                for entries in by_seed.values()]
      table[name][str(a)] = {'mean': float(np.mean(losses)), 'std': float(np.std(losses)),
                             'n': len(losses), 'losses': losses}
  result = {'seeds': list(map(int, _SEEDS.value)), 'fractions': FRACTIONS,
            'split': 'validation', 'train_steps': train_steps,
            'note': ('ft_N: the RA config (configs/ra_shakespeare_char.py) trained N steps from '
                     "dense's parameters; steps beyond dense's own 2000 are what fine-tuning "
                     'costs'),
            'loss': table, 'entries': results, **bench_common.environment()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  head = 'variant'.ljust(18) + ''.join(f'a={a:<14}' for a in FRACTIONS)
  print(head)
  for name, row in table.items():
    print(name.ljust(18) + ''.join(f'{row[str(a)]["mean"]:.4f}±{row[str(a)]["std"]:.4f}  '
                                   for a in FRACTIONS))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
