"""TFDS datasets -> token arrays -> batches.

Every split of the corpora used here is small enough to hold as one token array in host memory
(tiny_shakespeare: 1M characters). Training batches are random windows of `block_size + 1` tokens
drawn by a generator seeded with (seed, step): a batch is a pure function of the step, so a
resumed run sees exactly the batches it would have seen. In a multi-process run every process
holds the token arrays, draws the same window starts and reads only the windows of its own
devices (`process_rows`); `put` forms the global batch from those rows.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rag_jax import files
from rag_jax.data import text_files
from rag_jax.data import tokenizers
from rag_jax.errors import DataError

SPLITS = ('train', 'validation', 'test')


def data_dir(config: ml_collections.ConfigDict) -> str:
  path = os.path.expanduser(
      config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')
  if os.path.exists(path) and not os.path.isdir(path):
    source = 'config.data.data_dir' if config.data.data_dir else 'the TFDS data_dir'
    raise DataError(f'{source} {path} is a file, not a directory.')
  return path


def place_manual_file(source: str, data_dir_: str, name: str = 'input.txt') -> str | None:
  """Copies an offline copy of a corpus to where the stock TFDS builder looks for it."""
  if not source or not os.path.isfile(source):
    return None
  manual_dir = os.path.join(data_dir_, 'downloads', 'manual')
  os.makedirs(manual_dir, exist_ok=True)
  target = os.path.join(manual_dir, name)
  if not os.path.exists(target):
    files.copy(source, target)
  return target


def _builder(config: ml_collections.ConfigDict):
  if config.data.dataset == 'text_files':
    try:
      return text_files.builder(config.data.paths, data_dir(config))
    except text_files.TextFilesError as e:
      raise DataError(str(e)) from None
  try:
    return tfds.builder(config.data.dataset, data_dir=data_dir(config), file_format='array_record')
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f'config.data.dataset={config.data.dataset!r} is not a TFDS dataset; use a TFDS name '
        "such as 'tiny_shakespeare', or 'text_files' with config.data.paths.") from None


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(str(builder.data_dir), 'dataset_info.json'))


def prepare(config: ml_collections.ConfigDict):
  """Builds the dataset once (offline from <data_dir>/downloads/manual when the file is there)."""
  builder = _builder(config)
  if _is_prepared(builder):
    return builder
  manual_dir = os.path.join(data_dir(config), 'downloads', 'manual')
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f'could not prepare dataset {config.data.dataset!r} in {data_dir(config)}: '
        f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}\n'
        f'Offline, put the corpus at {manual_dir}/input.txt (for tiny_shakespeare: '
        '`make data` copies ../shared/data/tiny_shakespeare/input.txt there).') from None
  return builder


def load_texts(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The text of each split, from the prepared array_record files (no TensorFlow needed).
  `config.data.splits` maps our train/validation/test to TFDS split expressions (lm1b has no
  validation split: 'test[:50%]'); by default each is the TFDS split of its own name."""
  builder = prepare(config)
  names = config.data.get('splits') or {}
  texts = {}
  for split in SPLITS:
    name = names.get(split, split)  # a TFDS split expression, e.g. 'test[:50%]'
    if name.split('[')[0] not in builder.info.splits:
      raise DataError(
          f'dataset {config.data.dataset!r} has no {name.split("[")[0]!r} split (it has '
          f'{sorted(builder.info.splits)}); map our {split!r} split to one of those with '
          f"config.data.splits.{split}, e.g. 'train[:1%]'.")
    try:
      source = builder.as_data_source(split=name)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f'dataset {config.data.dataset!r} in {builder.data_dir}: split {name!r} cannot be read '
          f'as array_record ({type(e).__name__}: {e}); check the split expression (a slice takes '
          'whole examples, and may hold none), or delete that folder to rebuild it.') from None
    parts = [ex['text'] for ex in source]
    texts[split] = '\n'.join(p.decode('utf-8') if isinstance(p, bytes) else p for p in parts)
  return texts


@dataclasses.dataclass
class Dataset:
  tokenizer: tokenizers.Tokenizer
  splits: dict[str, np.ndarray]  # split -> tokens, in tokenizers.token_dtype(vocab_size)


def load(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer | None = None) -> Dataset:
  """Tokenized splits; builds the tokenizer from the train split unless one is given."""
  texts = load_texts(config)
  if tokenizer is None:
    tokenizer = tokenizers.build(config.data.tokenizer, texts['train'],
                                 config.data.get('vocab_size', 0))
  need = config.model.block_size + 1

  def check_length(split, tokens):
    if tokens < need:
      raise DataError(
          f'the {split} split has {tokens} tokens, fewer than block_size + 1 = {need}; '
          'use more text or a smaller config.model.block_size.')

  for split, text in texts.items():  # before encoding: a short split is named as such, not as
    check_length(split, len(text.encode('utf-8')))  # unknown characters (bytes >= tokens)
  splits = {}
  for split in list(texts):
    text = texts.pop(split)  # each text is freed once encoded
    try:
      splits[split] = tokenizer.encode(text)
    except tokenizers.TokenizerError as e:
      raise DataError(f'{split} split: {e}') from None
    check_length(split, len(splits[split]))
  return Dataset(tokenizer, splits)


def train_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int,
                step: int, rows: np.ndarray | None = None) -> np.ndarray:
  """`batch_size` random windows of `block_size + 1` tokens; a pure function of (seed, step).
  `rows`: only those windows of the batch (a process's share, `process_rows`)."""
  rng = np.random.default_rng((seed, step))
  starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
  if rows is not None:
    starts = starts[rows]
  return tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int32)


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray | None:
  """The rows of a `num_rows` batch split on its first axis by `sharding` that this process's
  devices hold, in order; None when a single process holds them all."""
  if sharding.is_fully_addressable:
    return None
  index = sharding.addressable_devices_indices_map((num_rows,))
  return np.array(sorted({r for idx in index.values() for r in range(num_rows)[idx[0]]}))


def put(batch, sharding: jax.sharding.Sharding, num_rows: int | None = None):
  """Numpy arrays (a batch, or a tuple of them) split on their first axis onto `sharding`.

  `num_rows=None`: `batch` is the whole batch on every process (each keeps its own rows).
  Otherwise `batch` holds this process's rows (`process_rows`) of a `num_rows` batch.
  Across processes the global batch is formed by `jax.make_array_from_process_local_data`.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(batch, sharding)

  def one(x):
    n = len(x) if num_rows is None else num_rows
    local = x[process_rows(sharding, n)] if num_rows is None else x
    return jax.make_array_from_process_local_data(sharding, local, (n, *x.shape[1:]))

  return jax.tree.map(one, batch)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int = -1):
  """Non-overlapping windows covering the split once; yields (tokens_Bx(T+1), weights_B).

  Every token after the first is predicted exactly once. The last batch is padded with
  zero-weight windows so one compiled eval step serves all batches.
  """
  num_windows = (len(tokens) - 1) // block_size
  starts = np.arange(num_windows) * block_size
  for b, i in enumerate(range(0, num_windows, batch_size)):
    if max_batches != -1 and b >= max_batches:
      return
    chunk = starts[i:i + batch_size]
    weights = np.zeros(batch_size, np.float32)
    weights[:len(chunk)] = 1.0
    chunk = np.pad(chunk, (0, batch_size - len(chunk)))
    yield tokens[chunk[:, None] + np.arange(block_size + 1)].astype(np.int32), weights
