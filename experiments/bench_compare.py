"""Runs a benchmark script of this checkout and of another one (e.g. the previous commit) in
alternating rounds, and writes both results and their ratios to one JSON file.

    git worktree add /tmp/old_tree HEAD~1
    python experiments/bench_compare.py --other=/tmp/old_tree --rounds=2 \
        --out=results/compare_train.json -- bench_train.py --config=configs/shakespeare_char.py

Each run is a fresh process with PYTHONPATH set to its checkout, so each imports its own
`rag_jax`. Rounds alternate (other, this, other, this, ...) so that load from other jobs on a
shared machine hits both alike. The summary holds, per round and checkout, every timing median
of the benchmark's JSON (`.../median` leaves: bench_train's step_ms, bench_activation's train
and decode times per point) and the ratio this / other of their medians over rounds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags
import numpy as np

from rag_jax import cli
import bench_common

_OTHER = flags.DEFINE_string('other', None, 'The other checkout (a git worktree).', required=True)
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternating rounds.')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)


def medians(obj, prefix='') -> dict[str, float]:
  """Every `.../median` number in a benchmark's JSON, by its path."""
  out = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      if k == 'median' and isinstance(v, (int, float)):
        out[prefix.rstrip('/')] = float(v)
      else:
        out.update(medians(v, f'{prefix}{k}/'))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      label = v.get('label') if isinstance(v, dict) else None
      if isinstance(v, dict) and 'sites' in v:  # bench_activation's points
        label = f"{v['sites']}|{v['structure']}|{v['active_fraction']}"
      out.update(medians(v, f'{prefix}{label or i}/'))
  return out


def run(tree: str, script_args: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    script, *args = script_args
    env = {**os.environ, 'PYTHONPATH': os.path.abspath(tree)}
    proc = subprocess.run([sys.executable, os.path.join(tree, 'experiments', script), *args,
                           f'--out={out}'], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f'{tree}: {script} failed:\n{proc.stderr[-3000:]}')
    with open(out) as f:
      return json.load(f)


def main(argv):
  script_args = argv[1:]
  if not script_args:
    raise SystemExit('give the benchmark after --, e.g. -- bench_train.py --config=...')
  trees = {'other': _OTHER.value, 'this': bench_common.ROOT}
  rounds = {name: [] for name in trees}
  for r in range(_ROUNDS.value):
    for name, tree in trees.items():
      print(f'round {r + 1}: {name} ({tree})', flush=True)
      rounds[name].append(medians(run(tree, script_args)))
  keys = sorted(set.intersection(*(set(m) for ms in rounds.values() for m in ms)))
  summary = {k: {name: float(np.median([m[k] for m in rounds[name]])) for name in trees}
             for k in keys}
  for k, v in summary.items():
    v['ratio_this_over_other'] = v['this'] / v['other']
  result = {'benchmark': script_args, 'trees': trees, 'rounds': rounds, 'summary': summary,
            **bench_common.environment()}
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)
  for k, v in summary.items():
    print(f"{k}: other {v['other']:.3f}, this {v['this']:.3f}, "
          f"ratio {v['ratio_this_over_other']:.3f}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
