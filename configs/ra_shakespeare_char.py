"""The default character model trained with random activation (docs/design.md §1).

a = 1 - lam * B, B ~ Beta(alpha=1, beta=1): the active fraction is uniform on [0.25, 1], drawn
per step and per layer, over MLP units and attention heads, nested (prefix) widths in 4 buckets.

    python -m rag_jax.train --config=configs/ra_shakespeare_char.py[:smoke|:gpu] --workdir=DIR
"""
import ml_collections

from rag_jax import configuration

_base = configuration.config_from(__file__, 'shakespeare_char.py')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = _base(arg)
  act = config.activation
  act.enabled = True
  act.alpha = 1.0
  act.beta = 1.0
  act.lam = 0.75
  act.sites = 'mlp,heads'
  act.structure = 'nested'
  # Static widths d/4 .. d; the :gpu model's 6 heads take sixths (2/6 .. 6/6 for a in [0.25, 1]).
  act.buckets = 6 if arg == 'gpu' else 4
  act.per_layer = True
  act.train_mode = 'single'
  return config
