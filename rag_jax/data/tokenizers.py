"""Tokenizers: characters (vocabulary built from the train split) and raw UTF-8 bytes.

A tokenizer is saved in the workdir as `tokenizer.json` so evaluate/sample decode exactly what
training saw.
"""
from __future__ import annotations

import json

import numpy as np

from rag_jax import files


# Characters per piece when a long text is encoded (a few MiB of temporaries per piece).
_CHUNK = 1 << 20


class TokenizerError(ValueError):
  """Text the tokenizer cannot encode, or a tokenizer file that cannot be read."""


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest integer type that holds every token id: encoded corpora are stored in it
  (uint8 for bytes and for tiny_shakespeare's 65 characters, a quarter of int32's memory);
  batches are cast to int32 when they are cut (data.train_batch, data.eval_batches)."""
  for dtype in (np.uint8, np.uint16):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  return np.dtype(np.int32)


class CharTokenizer:
  kind = 'char'

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars):
      raise TokenizerError('a character vocabulary must not repeat characters.')
    self.chars = chars
    self._index = {c: i for i, c in enumerate(chars)}
    # Code point -> id; every code point not in the vocabulary (the last entry stands for all
    # above the largest) -> len(chars).
    codes = np.array([ord(c) for c in chars], np.int64)
    self._table = np.full(int(codes.max(initial=-1)) + 2, len(chars), np.int32)
    self._table[codes] = np.arange(len(chars))

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    return cls(''.join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def unknown(self, text: str) -> list[str]:
    return sorted(set(text) - self._index.keys())

  def encode(self, text: str) -> np.ndarray:
    # Code points (UTF-32) looked up in a table, a piece at a time.
    ids = np.empty(len(text), token_dtype(self.vocab_size))
    last = len(self._table) - 1
    for start in range(0, len(text), _CHUNK):
      points = np.frombuffer(text[start:start + _CHUNK].encode('utf-32-le'), np.uint32)
      piece = self._table[np.minimum(points, last)]
      if np.any(piece == len(self.chars)):
        unknown = self.unknown(text)
        raise TokenizerError(
            f'text has {len(unknown)} character(s) the tokenizer does not know: '
            f'{"".join(unknown)!r}; the vocabulary holds only the characters of the training '
            'split.')
      ids[start:start + len(points)] = piece
    return ids

  def decode(self, ids) -> str:
    return ''.join(self.chars[int(i)] for i in ids)

  def to_json(self) -> dict:
    return {'kind': self.kind, 'chars': self.chars}


class ByteTokenizer:
  """UTF-8 bytes; decoding replaces incomplete sequences."""
  kind = 'byte'
  vocab_size = 256

  def unknown(self, text: str) -> list[str]:
    return []

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode('utf-8', errors='replace')

  def to_json(self) -> dict:
    return {'kind': self.kind}


Tokenizer = CharTokenizer | ByteTokenizer


def build(kind: str, train_text: str) -> Tokenizer:
  if kind == 'char':
    return CharTokenizer.from_text(train_text)
  if kind == 'byte':
    return ByteTokenizer()
  raise TokenizerError(f"unknown tokenizer {kind!r}; use 'char' or 'byte'.")


def save(tokenizer: Tokenizer, path: str) -> None:
  files.write_json(path, tokenizer.to_json(), indent=None)


def load(path: str) -> Tokenizer:
  try:
    with open(path) as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise TokenizerError(f'no tokenizer at {path}; was this workdir trained with rag_jax.train?')
  except json.JSONDecodeError as e:
    raise TokenizerError(f'tokenizer file {path} is damaged: {e}')
  if spec.get('kind') == 'char':
    return CharTokenizer(spec['chars'])
  if spec.get('kind') == 'byte':
    return ByteTokenizer()
  raise TokenizerError(f'tokenizer file {path} names an unknown kind {spec.get("kind")!r}.')
