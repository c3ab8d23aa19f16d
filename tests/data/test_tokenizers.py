import numpy as np
import pytest

from rag_jax.data import tokenizers


def test_char_round_trip_and_sorted_vocab():
  tok = tokenizers.CharTokenizer.from_text('hello world')
  assert tok.chars == ' dehlorw'
  ids = tok.encode('hold her')
  assert ids.dtype == np.uint8
  np.testing.assert_array_equal(ids, [3, 5, 4, 1, 0, 3, 2, 6])
  assert tok.decode(ids) == 'hold her'


def test_char_ids_in_the_smallest_type_and_any_vocabulary_order():
  """Over 256 characters the ids are uint16; a vocabulary that is not sorted (a saved one
  edited by hand) still maps each character to its own index."""
  chars = ''.join(chr(0x400 + i) for i in range(300))[::-1] + 'ab'
  tok = tokenizers.CharTokenizer(chars)
  text = 'ab' + chars[::7] + chr(0x400)
  ids = tok.encode(text)
  assert ids.dtype == np.uint16
  np.testing.assert_array_equal(ids, [chars.index(c) for c in text])
  assert tok.decode(ids) == text
  assert tokenizers.token_dtype(256) == np.uint8 and tokenizers.token_dtype(257) == np.uint16
  assert tokenizers.token_dtype(50304) == np.uint16 and tokenizers.token_dtype(70000) == np.int32


def test_char_unknown_character_is_named():
  tok = tokenizers.CharTokenizer.from_text('abc')
  with pytest.raises(tokenizers.TokenizerError, match=r"'xz'"):
    tok.encode('abxcz')


def test_byte_round_trip_unicode():
  tok = tokenizers.ByteTokenizer()
  text = 'Ümlaut — ok'
  ids = tok.encode(text)
  assert ids.dtype == np.uint8 and tok.decode(ids) == text
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
