"""Ablation over the shape (alpha, beta) and the bound lam of the switched-off fraction.

a = 1 - lam * B, B ~ Beta(alpha, beta) (docs/design.md §1): alpha, beta in {0.5, 1, 2} and lam in
{0.25, 0.5, 0.75}, 27 runs of configs/ra_shakespeare_char.py (mlp and heads, nested, 4 buckets),
plus the dense baseline. `:smoke` is the tiny model on alpha in {0.5, 2}, beta = 1, lam = 0.5
(3 runs, about a minute on 2 CPU cores); `:gpu` is nanoGPT's GPU model.

    python experiments/sweep.py --config=configs/ablations/alpha_beta_lambda.py[:smoke] \
        --sweep_dir=runs/alpha_beta_lambda
"""
import itertools

from rag_jax import configuration
from rag_jax import sweeps

# Every run starts from configs/ra_shakespeare_char.py[:ARG] ('', 'smoke' or 'gpu').
get_config = configuration.config_from(__file__, '../ra_shakespeare_char.py')


def sweep(arg=None):
  if arg == 'smoke':
    alphas, betas, lams = (0.5, 2.0), (1.0,), (0.5,)
  else:
    alphas, betas, lams = (0.5, 1.0, 2.0), (0.5, 1.0, 2.0), (0.25, 0.5, 0.75)
  yield dict(sweeps.DENSE)
  for lam, alpha, beta in itertools.product(lams, alphas, betas):
    yield {'activation.alpha': alpha, 'activation.beta': beta, 'activation.lam': lam}
