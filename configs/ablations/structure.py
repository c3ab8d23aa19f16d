"""Ablation over which units are on and how the drawn network is trained.

structure in {nested, random, bernoulli} x rescale in {off, on} x train_mode in {single,
sandwich}: 12 runs of configs/ra_shakespeare_char.py (alpha = beta = 1, lam = 0.75, mlp and
heads, 4 buckets), plus the dense baseline. `bernoulli` masks save no compute: its curve shows
quality only. `:smoke` is the tiny model on nested and random, no rescale, single (3 runs).

    python experiments/sweep.py --config=configs/ablations/structure.py[:smoke] \
        --sweep_dir=runs/structure
"""
import itertools

from rag_jax import activation
from rag_jax import configuration
from rag_jax import sweeps

# Every run starts from configs/ra_shakespeare_char.py[:ARG] ('', 'smoke' or 'gpu').
get_config = configuration.config_from(__file__, '../ra_shakespeare_char.py')


def sweep(arg=None):
  yield dict(sweeps.DENSE)
  if arg == 'smoke':
    grid = itertools.product(('nested', 'random'), (False,), ('single',))
  else:
    grid = itertools.product(activation.STRUCTURES, (False, True), ('single', 'sandwich'))
  for structure, rescale, train_mode in grid:
    yield {'activation.structure': structure, 'activation.rescale': rescale,
           'activation.train_mode': train_mode}
