"""Ablation over where the random activation acts: MLP units, attention heads, whole blocks.

Every non-empty subset of {mlp, heads, layers} (7 runs) of configs/ra_shakespeare_char.py
(alpha = beta = 1, lam = 0.75, nested, 4 buckets), plus the dense baseline. `:smoke` is the
tiny model on {mlp} and {layers} (3 runs).

    python experiments/sweep.py --config=configs/ablations/sites.py[:smoke] --sweep_dir=runs/sites
"""
import itertools

from rag_jax import configuration
from rag_jax import sweeps

SITES = ('mlp', 'heads', 'layers')

# Every run starts from configs/ra_shakespeare_char.py[:ARG] ('', 'smoke' or 'gpu').
get_config = configuration.config_from(__file__, '../ra_shakespeare_char.py')


def sweep(arg=None):
  yield dict(sweeps.DENSE)
  if arg == 'smoke':
    subsets = [('mlp',), ('layers',)]
  else:
    subsets = [s for n in range(1, len(SITES) + 1) for s in itertools.combinations(SITES, n)]
  for subset in subsets:
    yield {'activation.sites': ','.join(subset)}
