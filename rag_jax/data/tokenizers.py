"""Tokenizers: characters (vocabulary built from the train split), raw UTF-8 bytes, and
byte-level BPE (GPT-2's kind: trained on the train split, or read from GPT-2's vocab.json and
merges.txt), the last through Hugging Face `tokenizers`.

A tokenizer is saved in the workdir as `tokenizer.json` so evaluate/sample decode exactly what
training saw.
"""
from __future__ import annotations

import json

import numpy as np
import tokenizers as hf_tokenizers  # Hugging Face's (BPE)

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


class BPETokenizer:
  """Byte-level BPE: every text encodes (no unknown characters) and decodes back to itself.
  GPT-2's pre-tokenizer (its regex over letters, digits, spaces, punctuation; no prefix space),
  no normaliser; '<|endoftext|>' is one special token where the vocabulary holds it."""
  kind = 'bpe'
  END_OF_TEXT = '<|endoftext|>'

  def __init__(self, tokenizer):  # a hf_tokenizers.Tokenizer
    self._tok = tokenizer

  @staticmethod
  def _empty(model):
    tok = hf_tokenizers.Tokenizer(model)
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    return tok

  @classmethod
  def from_files(cls, vocab_path: str, merges_path: str) -> 'BPETokenizer':
    """GPT-2's tokenizer from its vocab.json and merges.txt."""
    try:
      with files.local_copies(vocab_path, merges_path) as (vocab, merges):
        tok = cls._empty(hf_tokenizers.models.BPE.from_file(vocab, merges))
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises Exception)
      raise TokenizerError(f'{vocab_path} and {merges_path} are not a BPE vocabulary and its '
                           f'merges ({e}).') from None
    if tok.token_to_id(cls.END_OF_TEXT) is not None:
      tok.add_special_tokens([cls.END_OF_TEXT])
    return cls(tok)

  @classmethod
  def train(cls, text: str, vocab_size: int) -> 'BPETokenizer':
    """A byte-level BPE of `vocab_size` tokens ('<|endoftext|>' (id 0), the 256 bytes and the
    merges) learnt from `text`, offline; the same text gives the same tokenizer."""
    tok = cls._empty(hf_tokenizers.models.BPE())
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=[cls.END_OF_TEXT],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_pieces(text), trainer)
    return cls(tok)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def unknown(self, text: str) -> list[str]:
    return []

  def encode(self, text: str) -> np.ndarray:
    encoded = self._tok.encode_batch(list(_pieces(text)), add_special_tokens=False)
    ids = np.empty(sum(len(e.ids) for e in encoded), token_dtype(self.vocab_size))
    start = 0
    for e in encoded:
      ids[start:start + len(e.ids)] = e.ids
      start += len(e.ids)
    return ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def to_json(self) -> dict:
    return {'kind': self.kind, 'tokenizer': json.loads(self._tok.to_str())}

  def save_files(self, directory: str) -> None:
    """GPT-2's vocab.json and merges.txt, which `transformers`' GPT2Tokenizer reads."""
    with files.local_dir(directory) as local:
      self._tok.model.save(local)

  @classmethod
  def from_json(cls, spec: dict) -> 'BPETokenizer':
    return cls(hf_tokenizers.Tokenizer.from_str(json.dumps(spec['tokenizer'])))


def _pieces(text: str):
  """`text` in pieces of about _CHUNK characters, each cut after a newline that a non-space
  follows: GPT-2's pre-tokenizer never joins across such a point, so encoding the pieces gives
  the ids of the whole (and the Rust encoder runs them in parallel)."""
  start = 0
  while start < len(text):
    cut = start + _CHUNK
    while cut < len(text) and not (text[cut - 1] == '\n' and not text[cut].isspace()):
      nxt = text.find('\n', cut)
      cut = len(text) if nxt < 0 else nxt + 1
    yield text[start:cut]
    start = cut


Tokenizer = CharTokenizer | ByteTokenizer | BPETokenizer


def build(kind: str, train_text: str, vocab_size: int = 0) -> Tokenizer:
  """The tokenizer of `kind` for a corpus whose train split is `train_text` (`vocab_size`:
  the BPE's, tokens in all)."""
  if kind == 'char':
    return CharTokenizer.from_text(train_text)
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'bpe':
    return BPETokenizer.train(train_text, vocab_size)
  raise TokenizerError(f"unknown tokenizer {kind!r}; use 'char', 'byte' or 'bpe'.")


def save(tokenizer: Tokenizer, path: str) -> None:
  files.write_json(path, tokenizer.to_json(), indent=None)


def load(path: str) -> Tokenizer:
  try:
    spec = files.read_json(path)
  except FileNotFoundError:
    raise TokenizerError(f'no tokenizer at {path}; was this workdir trained with rag_jax.train?')
  except json.JSONDecodeError as e:
    raise TokenizerError(f'tokenizer file {path} is damaged: {e}')
  if spec.get('kind') == 'char':
    return CharTokenizer(spec['chars'])
  if spec.get('kind') == 'byte':
    return ByteTokenizer()
  if spec.get('kind') == 'bpe':
    try:
      return BPETokenizer.from_json(spec)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises Exception)
      raise TokenizerError(f'tokenizer file {path} holds a BPE tokenizer that cannot be read '
                           f'({type(e).__name__}: {e}).') from None
  raise TokenizerError(f'tokenizer file {path} names an unknown kind {spec.get("kind")!r}.')
