"""Ablation over the number of static widths (`buckets`) a drawn fraction is rounded up to.

On MLP units and heads (the base sites of configs/ra_shakespeare_char.py), `buckets` must divide
the head count: every divisor above 1 (2 and 4 on the default model, 2, 3 and 6 on `:gpu`'s 6
heads). On MLP units alone, finer widths: 2 to 32 buckets. Plus the dense baseline. `:smoke` is
the tiny model with 2 buckets on mlp and heads and 8 on mlp alone (3 runs).

    python experiments/sweep.py --config=configs/ablations/buckets.py[:smoke] \
        --sweep_dir=runs/buckets
"""
from rag_jax import configuration
from rag_jax import sweeps

# Every run starts from configs/ra_shakespeare_char.py[:ARG] ('', 'smoke' or 'gpu').
get_config = configuration.config_from(__file__, '../ra_shakespeare_char.py')


def sweep(arg=None):
  model = get_config(arg).model
  yield dict(sweeps.DENSE)
  if arg == 'smoke':
    both, mlp_only = (2,), (8,)
  else:
    both = [b for b in range(2, model.num_heads + 1) if model.num_heads % b == 0]
    mlp_only = (2, 4, 8, 16, 32)
  for b in both:
    yield {'activation.buckets': b}
  for b in mlp_only:
    if model.mlp_dim % b == 0:
      yield {'activation.sites': 'mlp', 'activation.buckets': b}
