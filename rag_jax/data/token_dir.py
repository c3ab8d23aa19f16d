"""A corpus prepared once as token arrays (`config.data.dataset='tokens'`,
`config.data.paths=DIR`).

DIR holds `train.npy`, `validation.npy` and `test.npy` (one token array per split, in the
tokenizer's `token_dtype`), `tokenizer.json` (the tokenizer they were encoded with) and
`corpus.json` (where the text came from, its licence, and the tokens per split). Reading it needs
neither TensorFlow nor TFDS, so a prepared DIR can be copied to a machine that has only JAX (a
GPU host, a TPU VM) and trained from as it is: `python -m rag_jax.data.sotu` writes one.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from rag_jax import files
from rag_jax.data import tokenizers
from rag_jax.errors import DataError

SPLITS = ('train', 'validation', 'test')
MANIFEST = 'corpus.json'
TOKENIZER = 'tokenizer.json'
FORMAT = 'rag_jax token arrays 1'


def _manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise DataError(f"config.data.paths={directory!r}: no such directory (config.data.dataset="
                    "'tokens' reads a corpus prepared as token arrays, e.g. by "
                    '`python -m rag_jax.data.sotu --out=DIR`).')
  try:
    manifest = files.read_json(path)
  except (OSError, ValueError):
    manifest = None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise DataError(f'{directory} is not a corpus of prepared token arrays: it has no readable '
                    f'{MANIFEST} of format {FORMAT!r}.')
  return manifest


def check(directory: str) -> None:
  """DIR is a prepared corpus (its manifest readable), or one DataError."""
  _manifest(directory)


def load(directory: str, tokenizer: tokenizers.Tokenizer | None, splits: tuple[str, ...],
         block_size: int) -> tuple[tokenizers.Tokenizer, dict[str, np.ndarray]]:
  """The directory's tokenizer and the token arrays of `splits` (memory-mapped, read-only).

  `tokenizer`, where given (a resumed run's), must be the directory's own: tokens encoded with
  another are not the run's data."""
  manifest = _manifest(directory)
  own = tokenizers.load(os.path.join(directory, TOKENIZER))
  if tokenizer is not None and tokenizer.to_json() != own.to_json():
    raise DataError(f'{directory} was encoded with another tokenizer than the run\'s '
                    f'(vocabulary {own.vocab_size} against {tokenizer.vocab_size}); train from '
                    'the corpus the run was trained on.')
  out = {}
  for split in splits:
    path = os.path.join(directory, f'{split}.npy')
    try:
      tokens = np.load(path, mmap_mode='r')
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f'{path} cannot be read as a token array ({type(e).__name__}: {e}).') \
          from None
    want = manifest.get('tokens', {}).get(split)
    if tokens.ndim != 1 or (want is not None and len(tokens) != want):
      raise DataError(f'{path} holds {tokens.shape} tokens where {MANIFEST} says {want}: the '
                      'directory is damaged; prepare it again.')
    if len(tokens) and int(tokens.max()) >= own.vocab_size:
      raise DataError(f'{path} holds token ids beyond its tokenizer\'s {own.vocab_size}.')
    if len(tokens) < block_size + 1:
      raise DataError(f'the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = '
                      f'{block_size + 1}; use a smaller config.model.block_size.')
    out[split] = tokens
  return own, out


def write(directory: str, arrays: dict[str, np.ndarray], tokenizer: tokenizers.Tokenizer,
          manifest: dict) -> None:
  """Writes DIR whole or not at all (a temporary directory renamed into place). An existing DIR
  is replaced only if it is itself a prepared corpus: nothing else of the user's is overwritten."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(directory):
    if not os.path.isdir(directory) or (os.listdir(directory) and not os.path.isfile(
        os.path.join(directory, MANIFEST))):
      raise DataError(f'{directory} exists and is not a prepared corpus; name a new directory.')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tokens-', dir=parent)
  try:
    for split, tokens in arrays.items():
      np.save(os.path.join(tmp, f'{split}.npy'),
              np.asarray(tokens, tokenizers.token_dtype(tokenizer.vocab_size)))
    tokenizers.save(tokenizer, os.path.join(tmp, TOKENIZER))
    files.write_json(os.path.join(tmp, MANIFEST), {
        'format': FORMAT, **manifest, 'vocab_size': tokenizer.vocab_size,
        'tokens': {split: int(len(t)) for split, t in arrays.items()}})
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
