import numpy as np
import pytest

from rag_jax.data import tokenizers


def test_char_round_trip_and_sorted_vocab():
  tok = tokenizers.CharTokenizer.from_text('hello world')
  assert tok.chars == ' dehlorw'
  ids = tok.encode('hold her')
  assert ids.dtype == np.int32
  assert tok.decode(ids) == 'hold her'


def test_char_unknown_character_is_named():
  tok = tokenizers.CharTokenizer.from_text('abc')
  with pytest.raises(tokenizers.TokenizerError, match=r"'xz'"):
    tok.encode('abxcz')


def test_byte_round_trip_unicode():
  tok = tokenizers.ByteTokenizer()
  text = 'Ümlaut — ok'
  assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 256


@pytest.mark.parametrize('kind', ['char', 'byte'])
def test_save_load(tmp_path, kind):
  tok = tokenizers.build(kind, 'First Citizen:\nBefore we proceed')
  path = str(tmp_path / 'tokenizer.json')
  tokenizers.save(tok, path)
  loaded = tokenizers.load(path)
  assert loaded.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(loaded.encode('Before'), tok.encode('Before'))


def test_load_damaged_file(tmp_path):
  path = tmp_path / 'tokenizer.json'
  path.write_text('{"kind": "char", "cha')
  with pytest.raises(tokenizers.TokenizerError, match='damaged'):
    tokenizers.load(str(path))
