"""TFDS datasets -> token arrays -> batches.

Every split of the corpora used here is small enough to hold as one token array in host memory
(tiny_shakespeare: 1M characters). Training batches are random windows of `block_size + 1` tokens
drawn by a generator seeded with (seed, step): a batch is a pure function of the step, so a
resumed run sees exactly the batches it would have seen. In a multi-process run every process
holds the token arrays, draws the same window starts and reads only the windows of its own
devices (`process_rows`); `put` forms the global batch from those rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import sys
import urllib.parse

from absl import logging
from etils import epath

import jax
import ml_collections
import numpy as np

from rag_jax import files
from rag_jax.data import token_dir
from rag_jax.data import tokenizers
from rag_jax.errors import DataError

SPLITS = ('train', 'validation', 'test')
# TensorFlow, which TFDS loads only to build a stock dataset (text, no numerics), prints notices
# at start-up: the oneDNN one whatever the log level (off with oneDNN), the CPU-feature one at
# INFO. Set before it loads, where the user has not set them.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# Corpora shipped inside the package, placed where the stock TFDS builder reads a manual copy, so
# that they build offline with nothing downloaded (tiny_shakespeare: Shakespeare's plays, public
# domain; 1.1 MB; the file TFDS would download, same sha256).
BUNDLED_CORPORA = {
    'tiny_shakespeare': os.path.join(os.path.dirname(__file__), 'corpora', 'tiny_shakespeare.txt'),
}


def data_dir(config: ml_collections.ConfigDict) -> str:
  path = os.fspath(files.path(
      config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'))
  try:
    files.check_reachable(path)
  except OSError as e:
    raise DataError(f'data_dir {e}') from None
  if files.exists(path) and not files.isdir(path):
    source = 'config.data.data_dir' if config.data.data_dir else 'the TFDS data_dir'
    raise DataError(f'{source} {path} is a file, not a directory.')
  return path


def place_manual_file(source: str, data_dir_: str, name: str = 'input.txt') -> str | None:
  """Copies an offline copy of a corpus to where the stock TFDS builder looks for it."""
  if not source or not files.isfile(source):
    return None
  manual_dir = os.path.join(data_dir_, 'downloads', 'manual')
  files.makedirs(manual_dir)
  target = os.path.join(manual_dir, name)
  if not files.exists(target):
    files.copy(source, target)
  return target


def _builder(config: ml_collections.ConfigDict):
  # TFDS is imported here, not at the top: a corpus of prepared token arrays ('tokens') is read
  # without it (a machine with JAX alone trains from one).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from rag_jax.data import text_files  # pylint: disable=g-import-not-at-top
  if config.data.dataset == 'tokens':
    raise DataError("config.data.dataset='tokens' is a corpus of prepared token arrays, not "
                    'text: it has no TFDS builder.')
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
  return files.exists(os.path.join(str(builder.data_dir), 'dataset_info.json'))


def _check_reachable(builder, config: ml_collections.ConfigDict, timeout_s: float = 5.0) -> None:
  """A stock dataset to download: its host answers within `timeout_s`, or one DataError (TFDS
  would retry for minutes offline and then name the wrong cause)."""
  host = urllib.parse.urlparse(builder.info.homepage or '').hostname
  problem = host and files.unreachable(host, timeout_s)
  if problem:
    raise DataError(
        f'dataset {config.data.dataset!r} is not prepared in {data_dir(config)} and {host} '
        f'cannot be reached to download it ({problem}); prepare it on a machine with a network '
        'and copy the data_dir, or give other data: --config.data.dataset=text_files '
        '--config.data.paths=FILES.')


def prepare(config: ml_collections.ConfigDict):
  """Builds the dataset once (offline from <data_dir>/downloads/manual when the file is there),
  with one line saying so instead of TFDS's progress bars, its "Downloading and preparing"
  lines and TensorFlow's start-up notices."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _builder(config)
  if _is_prepared(builder):
    return builder
  manual_dir = os.path.join(data_dir(config), 'downloads', 'manual')
  place_manual_file(BUNDLED_CORPORA.get(config.data.dataset, ''), data_dir(config))
  if config.data.dataset != 'text_files' and not files.exists(manual_dir):
    _check_reachable(builder, config)
  if jax.process_index() == 0:
    print(f'rag_jax: preparing dataset {config.data.dataset!r} in {data_dir(config)} (once)',
          file=sys.stderr, flush=True)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints where it downloads to
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    hint = ''
    if config.data.dataset != 'text_files':  # a stock dataset: offline, the manual copy
      hint = f'\nOffline, put the corpus at {manual_dir}/input.txt.'
    if 'tensorflow' in text.lower():
      hint += "\nTFDS needs TensorFlow to build a stock dataset: pip install -e '.[tf]'."
    raise DataError(
        f'could not prepare dataset {config.data.dataset!r} in {data_dir(config)}: '
        f'{type(e).__name__}: {text.splitlines()[0] if text else ""}{hint}') from None
  return builder


def check_source(config: ml_collections.ConfigDict) -> None:
  """The corpus a config names is there, checked without reading it: a directory of prepared
  token arrays with its manifest, or text files that exist. (A TFDS dataset is built, or
  downloaded, when first loaded.) One DataError."""
  if config.data.dataset == 'tokens':
    token_dir.check(os.fspath(files.path(config.data.paths)))
  elif config.data.dataset == 'text_files':
    from rag_jax.data import text_files  # pylint: disable=g-import-not-at-top  (imports TFDS)
    try:
      text_files.resolve_paths(config.data.paths)
    except text_files.TextFilesError as e:
      raise DataError(str(e)) from None


def _split_name(config, split: str) -> str:
  return (config.data.get('splits') or {}).get(split, split)  # a TFDS split expression


def load_texts(config: ml_collections.ConfigDict,
               splits: tuple[str, ...] = SPLITS) -> dict[str, str]:
  """The text of each split, from the prepared array_record files (no TensorFlow needed).
  `config.data.splits` maps our train/validation/test to TFDS split expressions (lm1b has no
  validation split: 'test[:50%]'); by default each is the TFDS split of its own name."""
  builder = prepare(config)
  return {split: _read_split(builder, config, split) for split in splits}


def _read_split(builder, config, split: str) -> str:
  name = _split_name(config, split)
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
  return '\n'.join(p.decode('utf-8') if isinstance(p, bytes) else p for p in parts)


@dataclasses.dataclass
class Dataset:
  tokenizer: tokenizers.Tokenizer
  # split -> tokens, in tokenizers.token_dtype(vocab_size); read-only, memory-mapped from the
  # token cache (or in memory where the cache cannot be written).
  splits: dict[str, np.ndarray]


# The token cache: each (dataset, split, tokenizer) is encoded once and kept as a .npy file
# beside the prepared dataset, <builder.data_dir>/rag_jax_tokens/<corpus>/<tokenizer>/<split>.npy,
# then memory-mapped: a second `load` reads no text and holds no copy of the tokens. <corpus> is a
# hash of the prepared files (names, sizes, dataset_info.json), <tokenizer> a hash of the
# tokenizer's own file, so a changed corpus or tokenizer gets fresh tokens. The tokenizer built
# from a train split (char's alphabet, a trained BPE) is cached too, under its kind and size.
# Remote data_dirs (gs://...) cache on the local disk: a memory map needs a local file.
CACHE_DIR = 'rag_jax_tokens'
LOCAL_CACHE = os.path.join('~', '.cache', 'rag_jax', 'tokens')


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cache_root(builder) -> str:
  root = str(builder.data_dir)
  if '://' in root:
    return os.path.join(os.path.expanduser(LOCAL_CACHE), _digest(root))
  return os.path.join(root, CACHE_DIR)


def corpus_key(builder) -> str:
  """A hash of the prepared dataset's files: rebuilt or edited data gets a new key."""
  root = epath.Path(builder.data_dir)
  listing = sorted((p.name, p.stat().length) for p in root.iterdir()
                   if p.is_file() and p.name != 'dataset_info.json')
  info = (root / 'dataset_info.json').read_text()
  return _digest({'files': listing, 'info': info, 'dataset': str(builder.info.full_name)})


def _save_array(path: str, tokens: np.ndarray) -> None:
  """Writes `path` atomically: concurrent processes may write the same file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{socket.gethostname()}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    np.save(f, tokens)
  os.replace(tmp, path)


def _cached_tokenizer(config, builder, root: str) -> tokenizers.Tokenizer:
  kind, size = config.data.tokenizer, config.data.get('vocab_size', 0)
  path = os.path.join(root, 'tokenizers', f'{kind}_{size}.json')
  if os.path.isfile(path):
    try:
      return tokenizers.load(path)
    except tokenizers.TokenizerError:
      pass  # a damaged cache entry is rebuilt
  train_text = _read_split(builder, config, 'train')
  check_length(config, 'train', len(train_text.encode('utf-8')))
  tokenizer = tokenizers.build(kind, train_text, size)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tokenizers.save(tokenizer, path)
  except OSError as e:
    logging.warning('token cache: cannot write %s (%s); the tokenizer is rebuilt next time.',
                    path, e)
  return tokenizer


def check_length(config, split: str, tokens: int) -> None:
  need = config.model.block_size + 1
  if tokens < need:
    raise DataError(
        f'the {split} split has {tokens} tokens, fewer than block_size + 1 = {need}; '
        'use more text or a smaller config.model.block_size.')


def _encode(config, builder, split: str, tokenizer) -> np.ndarray:
  text = _read_split(builder, config, split)
  check_length(config, split, len(text.encode('utf-8')))  # before encoding: a short split is
  try:                                                     # named as such, not as unknown chars
    tokens = tokenizer.encode(text)
  except tokenizers.TokenizerError as e:
    raise DataError(f'{split} split: {e}') from None
  check_length(config, split, len(tokens))
  return tokens


def load(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer | None = None,
         splits: tuple[str, ...] = SPLITS) -> Dataset:
  """The tokenized `splits` (only those are read), from the token cache; builds the tokenizer
  from the train split unless one is given (a workdir's). A corpus of prepared token arrays
  (`dataset='tokens'`) brings its own tokenizer."""
  if config.data.dataset == 'tokens':
    return Dataset(*token_dir.load(os.fspath(files.path(config.data.paths)), tokenizer, splits,
                                   config.model.block_size))
  builder = prepare(config)
  cache = os.path.join(_cache_root(builder), corpus_key(builder))
  if tokenizer is None:
    tokenizer = _cached_tokenizer(config, builder, cache)
  cache = os.path.join(cache, _digest(tokenizer.to_json()))
  out = {}
  for split in splits:
    path = os.path.join(cache, re.sub(r'[^\w.%:\[\]-]', '_', _split_name(config, split)) + '.npy')
    if os.path.isfile(path):
      try:
        out[split] = np.load(path, mmap_mode='r')
        check_length(config, split, len(out[split]))
        continue
      except (ValueError, OSError, EOFError):
        logging.warning('token cache: %s is damaged; encoding %s again.', path, split)
    tokens = _encode(config, builder, split, tokenizer)
    try:
      _save_array(path, tokens)
      out[split] = np.load(path, mmap_mode='r')
    except OSError as e:
      logging.warning('token cache: cannot write %s (%s); tokens kept in memory.', path, e)
      out[split] = tokens
  return Dataset(tokenizer, out)


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
