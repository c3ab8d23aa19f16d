"""Depth schedules for the `layers` site, against dense models of fewer layers trained alone.

The RA model (configs/ra_shakespeare_char.py: 4 layers, lam 0.75, `single` training) with the
random activation on whole blocks only (`sites='layers'`: a fraction a keeps ceil(4a) blocks),
under each `activation.layer_schedule` (see rag_jax/activation.py):

  structure  nested: the first k blocks (an early exit), in training and at a fixed fraction;
  spaced     LayerDrop: a uniformly random k-subset in training; k evenly spaced blocks (the first
             and the last among them) at a fixed fraction;
  rising     LayerSkip's rates: blocks dropped with a rate rising linearly with depth in training;
             the first k blocks at a fixed fraction (an early exit, as LayerSkip decodes).

experiments/depth_keep.py scores every run under both keep rules (first blocks, evenly spaced).

Beside them, per seed, the dense models of 1, 2, 3 and 4 layers trained alone (the same steps
and recipe): a sub-model keeping k blocks computes exactly what a k-layer dense model does, so
their FLOPs per token are equal. Three seeds (0, 1, 2). `:smoke` is the tiny model (2 blocks),
one seed, spaced and rising, dense at 1 and 2 blocks.

    python experiments/sweep.py --config=configs/ablations/depth.py[:smoke] --sweep_dir=runs/depth
"""
from rag_jax import configuration
from rag_jax import sweeps

SCHEDULES = ('structure', 'spaced', 'rising')
SEEDS = (0, 1, 2)
LAYERS = {'activation.sites': 'layers'}

# Every run starts from configs/ra_shakespeare_char.py[:ARG] ('' or 'smoke').
get_config = configuration.config_from(__file__, '../ra_shakespeare_char.py')


def dense_layers(num_layers: int) -> dict:
  """The dense model of `num_layers` blocks (its evaluation truncates blocks, as the RA runs')."""
  return {**sweeps.DENSE, **LAYERS, 'model.num_layers': num_layers}


def sweep(arg=None):
  smoke = arg == 'smoke'
  full = get_config(arg).model.num_layers
  seeds = (0,) if smoke else SEEDS
  schedules = ('spaced', 'rising') if smoke else SCHEDULES
  depths = (full // 2, full) if smoke else tuple(range(full, 0, -1))
  for seed in seeds:  # the RA runs first: the dense ones are cheaper
    for schedule in schedules:
      yield {**LAYERS, 'activation.layer_schedule': schedule, 'seed': seed}
  for seed in seeds:
    for k in depths:
      yield {**dense_layers(k), 'seed': seed}
