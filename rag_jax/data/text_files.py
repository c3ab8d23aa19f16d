"""A TFDS builder for a user's own plain-text files (`config.data.dataset='text_files'`).

The files are concatenated (in the order given, globs sorted) and cut by characters into
train/validation/test (90/5/5, as TFDS tiny_shakespeare). Like tiny_shakespeare, each split is one
example holding its whole text. The builder config's name is a hash of the files' contents, so
editing a file builds a new dataset instead of reading a stale one.
"""
from __future__ import annotations

import glob
import hashlib
import os

from absl import logging
import tensorflow_datasets as tfds

from rag_jax import files as files_lib

SPLIT_FRACTIONS = {'train': 0.9, 'validation': 0.05, 'test': 0.05}


class TextFilesError(ValueError):
  pass


def resolve_paths(paths: str) -> list[str]:
  """Comma-separated files or globs -> existing files; a clear error for any that match nothing."""
  found = []
  for pattern in (p.strip() for p in paths.split(',')):
    if not pattern:
      continue
    matches = _glob(pattern)
    if not matches:
      raise TextFilesError(f'config.data.paths: {pattern!r} matches no file.')
    if all(files_lib.isdir(m) for m in matches):
      raise TextFilesError(f'config.data.paths: {pattern!r} is a directory; name its files '
                           f"(e.g. '{pattern.rstrip('/')}/*.txt').")
    found.extend(files_lib.absolute(m) for m in matches if files_lib.isfile(m))
  if not found:
    raise TextFilesError('config.data.paths names no text file.')
  return found


def _glob(pattern: str) -> list[str]:
  """Local globs with `glob`; cloud paths (gs://...) through epath, the pattern in the last
  component."""
  if files_lib.is_local(pattern):
    return sorted(glob.glob(os.fspath(files_lib.path(pattern))))
  path = files_lib.path(pattern)
  if not glob.has_magic(path.name):
    return [os.fspath(path)] if path.exists() else []
  return sorted(os.fspath(p) for p in path.parent.glob(path.name))


def split_text(text: str) -> dict[str, str]:
  n = len(text)
  a = int(n * SPLIT_FRACTIONS['train'])
  b = a + int(n * SPLIT_FRACTIONS['validation'])
  return {'train': text[:a], 'validation': text[a:b], 'test': text[b:]}


def read_files(files: list[str]) -> str:
  texts = []
  for path in files:
    data = files_lib.path(path).read_bytes()
    try:
      texts.append(data.decode('utf-8'))
    except UnicodeDecodeError as e:
      raise TextFilesError(f'{path} is not UTF-8 text ({e}).')
  return ''.join(texts)


class TextFilesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, files: list[str], **kwargs):
    digest = hashlib.sha256()
    for path in files:
      digest.update(path.encode())
      digest.update(hashlib.sha256(files_lib.path(path).read_bytes()).digest())
    super().__init__(name='h' + digest.hexdigest()[:16], **kwargs)
    self.files = files


class RagTextFiles(tfds.core.GeneratorBasedBuilder):
  """Plain-text files, split 90/5/5 by characters."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='User text files, concatenated and split 90/5/5 by characters.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = split_text(read_files(self.builder_config.files))
    return {name: self._generate_examples(text) for name, text in splits.items()}

  def _generate_examples(self, text):
    yield 0, {'text': text}


def builder(paths: str, data_dir: str) -> RagTextFiles:
  resolved = resolve_paths(paths)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # TFDS warns of every config it was not declared with
  try:
    return RagTextFiles(config=TextFilesConfig(files=resolved), data_dir=data_dir,
                        file_format='array_record')
  finally:
    logging.set_verbosity(verbosity)
