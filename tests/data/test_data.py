import numpy as np
import pytest

from rag_jax import files
from rag_jax.data import pipeline as data
from tests.conftest import SHAKESPEARE_TXT


@pytest.mark.slow
def test_tiny_shakespeare_splits_partition_the_corpus(smoke_config):
  """The three splits are consecutive, disjoint pieces that together are the whole corpus."""
  texts = data.load_texts(smoke_config)
  corpus = SHAKESPEARE_TXT.read_text()
  assert texts['train'] + texts['validation'] + texts['test'] == corpus
  assert len(texts['train']) > 0.89 * len(corpus)
  # No 100-character window of validation or test occurs in train.
  for split in ('validation', 'test'):
    for start in range(0, len(texts[split]) - 100, 5000):
      assert texts[split][start:start + 100] not in texts['train']


@pytest.mark.slow
def test_load_tokenizes_with_train_vocabulary(smoke_config):
  ds = data.load(smoke_config)
  assert ds.tokenizer.vocab_size == 65
  assert ds.splits['train'].dtype == np.uint8  # 65 ids: stored in a byte each
  assert ds.tokenizer.decode(ds.splits['train'][:14]) == 'First Citizen:'
  batch = data.train_batch(ds.splits['train'], 4, 16, seed=0, step=0)
  assert batch.dtype == np.int32 and batch.max() < 65
  assert next(data.eval_batches(ds.splits['validation'], 16, 4))[0].dtype == np.int32


def test_train_batch_is_a_pure_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  a = data.train_batch(tokens, 4, 16, seed=0, step=3)
  assert a.shape == (4, 17)
  np.testing.assert_array_equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows
  np.testing.assert_array_equal(a, data.train_batch(tokens, 4, 16, seed=0, step=3))
  assert not np.array_equal(a, data.train_batch(tokens, 4, 16, seed=0, step=4))
  assert not np.array_equal(a, data.train_batch(tokens, 4, 16, seed=1, step=3))


def test_eval_batches_predict_every_token_once():
  tokens = np.arange(1001, dtype=np.int32)
  targets, total = [], 0
  for batch, weights in data.eval_batches(tokens, block_size=10, batch_size=8):
    assert batch.shape == (8, 11)
    for row, w in zip(batch, weights):
      if w:
        targets.extend(row[1:])
        total += 1
  assert total == 100
  np.testing.assert_array_equal(np.sort(targets), np.arange(1, 1001))


def test_eval_batches_respect_max_batches():
  tokens = np.arange(1001, dtype=np.int32)
  assert len(list(data.eval_batches(tokens, 10, 8, max_batches=2))) == 2


def _text_files_config(smoke_config, paths):
  smoke_config.data.dataset = 'text_files'
  smoke_config.data.paths = paths
  return smoke_config


def test_text_files_builder(tmp_path, smoke_config):
  (tmp_path / 'a.txt').write_text('alpha beta gamma\n' * 200)
  (tmp_path / 'b.txt').write_text('delta epsilon\n' * 200)
  config = _text_files_config(smoke_config, f'{tmp_path}/*.txt')
  config.data.data_dir = str(tmp_path / 'tfds')
  texts = data.load_texts(config)
  whole = (tmp_path / 'a.txt').read_text() + (tmp_path / 'b.txt').read_text()
  assert texts['train'] + texts['validation'] + texts['test'] == whole
  assert len(texts['train']) == int(0.9 * len(whole))
  ds = data.load(config)
  assert ds.tokenizer.decode(ds.splits['test']) == texts['test']


def test_text_files_rebuilds_when_a_file_changes(tmp_path, smoke_config):
  f = tmp_path / 'a.txt'
  f.write_text('one two three\n' * 300)
  config = _text_files_config(smoke_config, str(f))
  config.data.data_dir = str(tmp_path / 'tfds')
  first = data.load_texts(config)['train']
  f.write_text('four five six\n' * 300)
  assert data.load_texts(config)['train'] != first


def test_text_files_missing_file_is_named(tmp_path, smoke_config):
  config = _text_files_config(smoke_config, str(tmp_path / 'nope.txt'))
  with pytest.raises(data.DataError, match='nope.txt.*matches no file'):
    data.load(config)


def test_binary_corpus_is_named_without_the_stock_dataset_hint(tmp_path, smoke_config, capfd):
  (tmp_path / 'a.txt').write_bytes(bytes(range(128, 256)) * 40)
  config = _text_files_config(smoke_config, str(tmp_path / 'a.txt'))
  config.data.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(data.DataError) as e:
    data.load(config)
  assert str(e.value).endswith('a.txt is not UTF-8 text (\'utf-8\' codec can\'t decode byte 0x80 '
                               'in position 0: invalid start byte).'), str(e.value)
  assert 'manual' not in str(e.value) and '\n' not in str(e.value)
  out, err = capfd.readouterr()  # building says one line of its own, none of TFDS's
  assert f"rag_jax: preparing dataset 'text_files' in {tmp_path / 'tfds'} (once)" in err
  assert 'Downloading and preparing' not in out + err and 'custom data configuration' not in err


def test_unreachable_stock_dataset_is_one_line_at_once(tmp_path, smoke_config, monkeypatch):
  """Offline, a stock dataset that is not prepared is refused at once (TFDS would retry its
  download for minutes), naming the host and a way out, not the manual-copy hint."""
  import socket
  hosts = []

  def unreachable(address, timeout=None):
    hosts.append((address, timeout))
    raise OSError('Network is unreachable')
  monkeypatch.setattr(socket, 'create_connection', unreachable)
  files.unreachable.cache_clear()  # no earlier answer about the host, and none left behind
  smoke_config.data.dataset = 'lm1b'
  smoke_config.data.data_dir = str(tmp_path / 'tfds')
  try:
    with pytest.raises(data.DataError) as e:
      data.load(smoke_config)
  finally:
    files.unreachable.cache_clear()
  assert hosts == [(('www.statmt.org', 443), 5.0)]
  assert str(e.value) == (
      f"dataset 'lm1b' is not prepared in {tmp_path / 'tfds'} and www.statmt.org cannot be "
      'reached to download it (OSError: Network is unreachable); prepare it on a machine with a '
      'network and copy the data_dir, or give other data: --config.data.dataset=text_files '
      '--config.data.paths=FILES.')


def test_unknown_tfds_name(smoke_config):
  smoke_config.data.dataset = 'no_such_dataset_xyz'
  with pytest.raises(data.DataError, match='not a TFDS dataset'):
    data.load(smoke_config)


def test_split_shorter_than_a_block(tmp_path, smoke_config):
  (tmp_path / 'a.txt').write_text('tiny corpus ' * 20)
  config = _text_files_config(smoke_config, str(tmp_path / 'a.txt'))
  config.data.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(data.DataError, match='fewer than block_size'):
    data.load(config)


def test_token_cache_is_reused_memory_mapped_and_reads_no_text(smoke_config, monkeypatch):
  first = data.load(smoke_config)
  reads = []
  original = data._read_split
  monkeypatch.setattr(data, '_read_split', lambda *a: reads.append(a[2]) or original(*a))
  second = data.load(smoke_config)
  assert reads == []  # the tokenizer and every split came from the cache
  for split in data.SPLITS:
    assert isinstance(second.splits[split], np.memmap)
    np.testing.assert_array_equal(first.splits[split], second.splits[split])
  assert second.tokenizer.to_json() == first.tokenizer.to_json()
  only = data.load(smoke_config, splits=('validation',))
  assert list(only.splits) == ['validation']


def test_token_cache_loads_only_the_splits_asked(tmp_path, smoke_config, monkeypatch):
  smoke_config.data.data_dir = str(tmp_path / 'tfds')
  reads = []
  original = data._read_split
  monkeypatch.setattr(data, '_read_split', lambda *a: reads.append(a[2]) or original(*a))
  ds = data.load(smoke_config, splits=('test',))
  assert reads == ['train', 'test']  # train for the tokenizer's alphabet, then test only
  assert list(ds.splits) == ['test']


def test_token_cache_follows_the_tokenizer_and_the_corpus(tmp_path, smoke_config):
  f = tmp_path / 'a.txt'
  f.write_text('one two three\n' * 300)
  config = _text_files_config(smoke_config, str(f))
  config.data.data_dir = str(tmp_path / 'tfds')
  chars = data.load(config)
  as_bytes = data.load(config, data.tokenizers.ByteTokenizer())
  assert as_bytes.tokenizer.decode(as_bytes.splits['train']) == chars.tokenizer.decode(
      chars.splits['train'])
  assert not np.array_equal(as_bytes.splits['train'], chars.splits['train'])  # its own tokens
  f.write_text('four five six\n' * 300)  # an edited corpus: new tokens and a new alphabet
  edited = data.load(config)
  assert edited.tokenizer.decode(edited.splits['train']).startswith('four five six')
  assert set(edited.tokenizer.to_json()['chars']) == set('fourivesx \n')


def test_token_cache_rebuilds_a_damaged_file(tmp_path, smoke_config):
  smoke_config.data.data_dir = str(tmp_path / 'tfds')
  first = data.load(smoke_config, splits=('validation',))
  path = first.splits['validation'].filename
  tokens = np.array(first.splits['validation'])  # a copy: the file is damaged below
  del first
  with open(path, 'wb') as f:
    f.write(b'not a numpy file')
  again = data.load(smoke_config, splits=('validation',))
  np.testing.assert_array_equal(np.asarray(again.splits['validation']), tokens)
  assert len(tokens) > 1000
  text = data.load_texts(smoke_config)['validation']  # and they are the split's text
  assert again.tokenizer.decode(again.splits['validation']) == text
