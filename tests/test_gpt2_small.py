"""configs/gpt2_small.py: GPT-2 small's shape, its variants, TFDS split expressions."""
import json
import os

import jax
import pytest

from rag_jax import configuration
from rag_jax.data import pipeline as data_lib
from rag_jax import runs
from rag_jax import train
from tests.conftest import load_config


@pytest.mark.parametrize('arg', ['', 'smoke', 'ra', 'ra_smoke'])
def test_variants_validate(arg):
  config = load_config('gpt2_small', arg or None)
  configuration.validate(config)
  assert config.data.tokenizer == 'byte'
  assert config.activation.enabled == arg.startswith('ra')


def test_gpt2_small_shape():
  config = load_config('gpt2_small', 'ra')
  m = config.model
  assert ((m.num_layers, m.num_heads, m.embed_dim, m.mlp_dim, m.block_size)
          == (12, 12, 768, 3072, 1024))
  assert m.num_heads % config.activation.buckets == 0 and m.mlp_dim % config.activation.buckets == 0
  assert config.dtype == 'bfloat16' and config.data.dataset == 'lm1b'
  assert m.gelu == 'tanh'  # GPT-2's 'gelu_new'
  model = runs.make_model(config, 256)
  params = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, 8), jax.numpy.int32)),
                          jax.random.key(0))['params']
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == 85_936_896  # 124M with GPT-2's 50304-token vocabulary instead of 256 bytes


def test_split_expressions(tfds_dir):
  config = load_config('gpt2_small', 'smoke')
  config.data.data_dir = tfds_dir
  full = data_lib.load_texts(config)
  # Slices take whole examples; tiny_shakespeare's splits are one example each.
  config.data.splits.update(validation='test', test='validation[:100%]')
  mapped = data_lib.load_texts(config)
  assert mapped == {'train': full['train'], 'validation': full['test'], 'test': full['validation']}
  config.data.splits.validation = 'dev'
  with pytest.raises(data_lib.DataError, match="no 'dev' split.*config.data.splits.validation"):
    data_lib.load_texts(config)


@pytest.mark.slow
def test_ra_smoke_trains(tfds_dir, tmp_path):
  config = load_config('gpt2_small', 'ra_smoke')
  config.data.data_dir = tfds_dir
  last = train.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  assert last['eval_loss'] < first['train_loss'] - 1.0  # from about ln(256) = 5.5 nats
