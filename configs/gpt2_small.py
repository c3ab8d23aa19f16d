"""GPT-2 small's shape (124M with GPT-2's vocabulary) on bytes of a TFDS text dataset.

12 layers, 12 heads, 768 dims, MLP 3072 (GPT-2's tanh GELU), context 1024, AdamW as nanoGPT's
GPT-2 recipe
(lr 6e-4 -> 6e-5 cosine, warmup 2000, beta2 0.95, wd 0.1, clip 1.0), bfloat16 activations.
The vocabulary is the byte tokenizer's 256 (a multiple of 128, so the embedding and output
matmuls tile evenly; GPT-2's 50304 is its BPE vocabulary padded, which is not available
offline), which makes 85.9M parameters; batches of 32 x 1024 tokens (no gradient accumulation).

The dataset is any TFDS text dataset with a `text` feature, by name: `lm1b` by default (it has
train and test splits only, so test is cut in half for validation and test; it needs a network to
build, ~4 GB of text: take a part with `--config.data.splits.train='train[:10%]'`). Every
process holds its splits' tokens in host memory.

    python -m rag_jax.train --config=configs/gpt2_small.py[:smoke|:ra|:ra_smoke] --workdir=DIR

`:smoke` is a 2-layer model of the same family on tiny_shakespeare (offline), float32, 40 steps;
`:ra` and `:ra_smoke` add the random activation of configs/ra_shakespeare_char.py (alpha = beta
= 1, lam = 0.75, nested mlp and heads, 4 buckets: 3 of the 12 heads and 768 of the 3072 units
each). docs/scaling.md gives the GPU, Colab and TPU pod commands.
"""
import os

import ml_collections

from rag_jax import configuration

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ('', 'smoke', 'ra', 'ra_smoke')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ''
  if arg not in VARIANTS:
    raise configuration.UnknownVariant(arg, VARIANTS)
  smoke = arg.endswith('smoke')
  config = configuration.load_config(os.path.join(HERE, 'shakespeare_char.py'),
                                     'smoke' if smoke else None)
  config.data.tokenizer = 'byte'
  if arg.startswith('ra'):
    config.activation = configuration.load_config(
        os.path.join(HERE, 'ra_shakespeare_char.py')).activation
  if smoke:  # the tiny model and schedule of shakespeare_char:smoke, on bytes, a wider model.
    config.model.update(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=256, block_size=64)
    config.update(num_steps=40, eval_every=20, checkpoint_every=20)
    config.opt.warmup_steps = 5
    return config

  config.data.dataset = 'lm1b'
  config.data.splits.update(validation='test[:50%]', test='test[50%:]')
  # GPT-2's own GELU is the tanh approximation ('gelu_new'); on an H100 it also made the step
  # 0.97x the exact one's (experiments/probe_step_variants.py).
  config.model.update(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, block_size=1024,
                      dropout=0.0, use_bias=False, gelu='tanh')
  config.opt.update(learning_rate=6e-4, min_learning_rate=6e-5, warmup_steps=2000, b1=0.9,
                    b2=0.95, weight_decay=0.1, grad_clip=1.0)
  # 32 x 1024 tokens a step, 100k steps: 3.3B tokens.
  config.update(dtype='bfloat16', batch_size=32, num_steps=100_000, log_every=100,
                eval_every=2000, eval_batch_size=32, eval_batches=20, checkpoint_every=2000)
  return config
