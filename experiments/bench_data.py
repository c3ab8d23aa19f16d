"""Host memory and time of loading a tokenized corpus (`rag_jax.data.pipeline.load`).

    python experiments/bench_data.py --out=results/bench_data.json [--megabytes=128]
        [--tokenizers=char,byte] [--compare=PATH_TO_ANOTHER_CHECKOUT]

A synthetic `text_files` corpus of `megabytes` MB (tiny_shakespeare repeated, so the character
vocabulary is its 65 characters) is built once with TFDS in a temporary directory. Then, for
each tokenizer, a fresh Python process runs `data.load` and reports the seconds it took, the
growth of the process's peak resident memory over its peak just before the call, and the bytes
of the token arrays it returned; then a second fresh process does the same (`start`: 'first',
'second'): with the token cache the second start memory-maps the tokens the first one wrote.
`--compare` runs the same measurement with the `rag_jax` of another checkout (e.g. a
`git worktree` of an older commit, before the cache) in the same run, for a ratio.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from rag_jax import cli
import bench_common

_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_MEGABYTES = flags.DEFINE_integer('megabytes', 128, 'Corpus size in MB (1e6 bytes).')
_TOKENIZERS = flags.DEFINE_list('tokenizers', ['char', 'byte'], 'Tokenizers to measure.')
_COMPARE = flags.DEFINE_string('compare', None, 'Another checkout whose rag_jax to measure too.')

SHAKESPEARE = os.path.join(bench_common.ROOT, 'rag_jax', 'data', 'corpora', 'tiny_shakespeare.txt')

# Runs in a fresh process: argv = data_dir, corpus glob, tokenizer or 'prepare' (only builds).
_CHILD = r'''
import json, resource, sys, time
import ml_collections
from rag_jax.data import pipeline as data
data_dir, paths, tokenizer = sys.argv[1:4]
config = ml_collections.ConfigDict({
    'data': {'dataset': 'text_files', 'paths': paths, 'data_dir': data_dir,
             'tokenizer': tokenizer, 'splits': {}},
    'model': {'block_size': 256}})
data.prepare(config)  # builds the TFDS dataset the first time (its own process)
if tokenizer == 'prepare':
  sys.exit()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak()
t0 = time.perf_counter()
ds = data.load(config)
seconds = time.perf_counter() - t0
after = peak()
print('RESULT', json.dumps({
       'load_s': seconds, 'peak_rss_growth_mib': after - before, 'peak_rss_mib': after,
       'token_mib': sum(t.nbytes for t in ds.splits.values()) / 2**20,
       'token_dtype': str(ds.splits['train'].dtype),
       'tokens': int(sum(len(t) for t in ds.splits.values()))}))
'''


def _measure(repo: str, data_dir: str, paths: str, tokenizer: str) -> dict:
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _CHILD, data_dir, paths, tokenizer], cwd=repo,
                        env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{repo}: {tokenizer}: {proc.stderr.strip().splitlines()[-1]}')
  results = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  return json.loads(results[-1][len('RESULT '):]) if results else {}


def _commit(repo: str) -> str | None:
  """The checkout's commit, '+dirty' when it has uncommitted changes to tracked files."""
  run = lambda *a: subprocess.run(['git', '-C', repo, *a], capture_output=True, text=True,
                                  check=False)
  head = run('rev-parse', '--short', 'HEAD')
  if head.returncode:
    return None
  dirty = run('status', '--porcelain', '--untracked-files=no').stdout.strip()
  return head.stdout.strip() + ('+dirty' if dirty else '')


def main(argv):
  del argv
  with open(SHAKESPEARE, encoding='utf-8') as f:
    unit = f.read()
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, 'corpus.txt')
    with open(corpus, 'w', encoding='utf-8') as f:
      for _ in range(max(1, _MEGABYTES.value * 10**6 // len(unit.encode()))):
        f.write(unit)
    data_dir = os.path.join(tmp, 'tfds')
    _measure(bench_common.ROOT, data_dir, corpus, 'prepare')
    repos = {'this': bench_common.ROOT}
    if _COMPARE.value:
      repos['compare'] = os.path.abspath(_COMPARE.value)
    points = []
    for tokenizer in _TOKENIZERS.value:
      for name, repo in repos.items():
        for start in ('first', 'second'):
          point = {'tokenizer': tokenizer, 'code': name, 'start': start, 'repo': repo,
                   'commit': _commit(repo), **_measure(repo, data_dir, corpus, tokenizer)}
          print(json.dumps(point))
          points.append(point)
    corpus_mb = os.path.getsize(corpus) / 1e6
  result = {'corpus_mb': corpus_mb, 'points': points, **bench_common.environment(),
            'load_average': os.getloadavg()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
