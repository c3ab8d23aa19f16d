"""Bring a Hugging Face GPT-2 checkpoint in as a rag_jax model directory.

    python -m rag_jax.convert --hf_dir=DIR --out=OUT [--config=configs/gpt2_small.py]

DIR is what `GPT2LMHeadModel.save_pretrained` writes (config.json, model.safetensors) with the
tokenizer's vocab.json and merges.txt (`GPT2Tokenizer.save_pretrained`). OUT is a model directory
in the layout rag_jax.export writes (config.json, tokenizer.json, model.safetensors,
export.json): `evaluate` and `sample` take it as they take a workdir, and a new run fine-tunes
it with `--config.init_from=OUT` (dense, or with random activation). OUT's config is `--config`
(its data, optimizer and schedule) with the checkpoint's model (rag_jax/hf_gpt2.py: biases,
tanh GELU, n_positions as block_size) and its GPT-2 BPE tokenizer.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags
import jax
import ml_collections
import numpy as np

from rag_jax import cli
from rag_jax import configuration
from rag_jax import export as export_lib
from rag_jax import files
from rag_jax import hf_gpt2
from rag_jax import weights as weights_lib
from rag_jax import workdir as workdir_lib
from rag_jax.data import tokenizers
from rag_jax.errors import WorkdirError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'gpt2_small.py')


def load_tokenizer(hf_dir: str) -> tokenizers.BPETokenizer:
  paths = [os.path.join(hf_dir, f) for f in hf_gpt2.TOKENIZER_FILES]
  missing = [p for p in paths if not files.isfile(p)]
  if missing:
    raise WorkdirError(f'{", ".join(missing)} missing: the GPT-2 tokenizer is needed to encode '
                       'prompts and data (GPT2Tokenizer.save_pretrained writes both files).')
  return tokenizers.BPETokenizer.from_files(*paths)


def convert(hf_dir: str, out: str, base: ml_collections.ConfigDict | None = None,
            dtype: str | None = 'float32') -> dict[str, Any]:
  """Writes the GPT-2 checkpoint in `hf_dir` as a rag_jax model directory `out` (new, or an
  earlier conversion of the same checkpoint); returns its export.json content. The model runs
  in `dtype` (float32 by default: transformers' logits within 1e-4; None: the base config's).
  Every input is checked before anything is written."""
  if files.absolute(out) == files.absolute(hf_dir):
    raise ValueError('--out must not be the Hugging Face directory.')
  if base is None:
    base = configuration.load_config(DEFAULT_CONFIG)
  hf_config = hf_gpt2.read_config(hf_dir)
  fields = hf_gpt2.model_fields(hf_config, os.path.join(hf_dir, hf_gpt2.CONFIG_FILE))
  vocab = fields.pop('vocab_size')
  tokenizer = load_tokenizer(hf_dir)
  if tokenizer.vocab_size != vocab:
    raise WorkdirError(f'{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model '
                       f'{vocab} (config.json vocab_size); they must be the same.')
  params = hf_gpt2.from_hf(hf_gpt2.read_tensors(hf_dir), {**fields, 'vocab_size': vocab},
                           os.path.join(hf_dir, hf_gpt2.WEIGHTS_FILE))
  record = {'hf_dir': files.absolute(hf_dir), 'step': 0, 'active_fraction': 1.0, 'int8': False}
  export_lib.check_out(out, record)
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.update(fields)
  config.data.tokenizer, config.data.vocab_size = 'bpe', vocab
  config.activation.enabled, config.activation.lam = False, 0.0
  if dtype is not None:
    config.dtype = dtype
  if config.get('init_from'):
    config.init_from = ''
  configuration.validate(config)
  workdir_lib.check_writable(out, create=True)
  path = weights_lib.save(params, out)
  workdir_lib.save_config(config, out)
  tokenizers.save(tokenizer, os.path.join(out, workdir_lib.TOKENIZER_FILE))
  record.update(source='huggingface gpt2', model=dict(fields), vocab_size=vocab,
                dtype=config.get('dtype', 'float32'),
                parameters=int(sum(np.size(x) for x in jax.tree.leaves(params))),
                bytes=files.getsize(path))
  files.write_json(os.path.join(out, weights_lib.EXPORT_FILE), record)
  return record


def _define_flags():
  flags.DEFINE_string('hf_dir', None, 'A Hugging Face GPT-2 checkpoint directory.', required=True)
  flags.DEFINE_string('out', None, 'The rag_jax model directory to write.', required=True)
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG, 'Config file (path.py[:variant]) whose data, optimizer and '
      'schedule the converted model carries; --config.FIELD=VALUE overrides a field as in '
      'train. The model runs in float32 unless --config.dtype says otherwise.',
      lock_config=True)


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  f = flags.FLAGS
  try:
    given = cli.config_overrides(sys.argv)
    record = convert(f.hf_dir, f.out, f.config, None if 'dtype' in given else 'float32')
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  print(f"wrote {f.out}: GPT-2 with {record['parameters']:,} parameters, model "
        f"{record['model']}, vocabulary {record['vocab_size']}, running in {record['dtype']}")


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
