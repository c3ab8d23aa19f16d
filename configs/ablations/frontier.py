"""The honest comparison: random-activation sub-models against dense models trained on their own
at the same FLOPs per token, three seeds each, and the training modes that close the gap.

The RA model (configs/ra_shakespeare_char.py: 4 layers, 4 heads of 32, 512 MLP units, lam 0.75,
nested mlp and heads, 4 buckets) at a fixed fraction a computes the first a·H heads and a·F MLP
units of every block: as a deployed sub-model (`rag_jax.export`) it *is* a dense model with
a·H heads of the same head width and a·F units. So the dense model matched to budget a has
exactly that shape, trained alone with the same data, steps and recipe: its FLOPs per token equal
the sub-model's exactly (whole heads and units: a ∈ {1, 0.75, 0.5, 0.25} of 4 heads and 512
units). Per seed (0, 1, 2):

  dense at a = 1, 0.75, 0.5, 0.25         (2000 steps; a = 1 is the dense baseline)
  dense at a = 0.75, 0.5, 0.25, more steps (equal training FLOPs: as many as the `single` RA run
                                           costs to train, see `equal_flops_steps`)
  RA single | sandwich | sandwich + in-place distillation | the sandwich rule (smallest, full
  and 2 drawn widths) + distillation

`experiments/collect.py` writes frontier.md and frontier.png for this sweep. `:smoke` is the tiny
model, one seed, budgets 1 and 0.5, no equal-FLOPs runs. `:large` repeats the main comparison on
the 6.0M-parameter model (configs/shakespeare_char.py:large, 8 heads of 36, 1152 MLP units): the
dense models at the four budgets and the `distill` and `rule` RA runs, three seeds, no
equal-FLOPs runs (18 runs; about 13 minutes for a full-width dense run on 2 CPU cores).
`:routed` trains the large model's `rule` run for the learned router (rag_jax/router.py) with a
mixed pass (`activation.mixed_share` 0.2) whose full-width positions are drawn at random or are
the step's largest expected gains (`mixed_routing` 'random' | 'gain', Mixture-of-Depths' top-k),
three seeds (6 runs; about 31 minutes each on 2 CPU cores).

    python experiments/sweep.py --config=configs/ablations/frontier.py[:smoke] \
        --sweep_dir=runs/frontier
"""
import ml_collections

from rag_jax import activation
from rag_jax import configuration
from rag_jax import flops
from rag_jax import runs
from rag_jax import sweeps
from rag_jax.models import gpt

_base = configuration.config_from(__file__, '../ra_shakespeare_char.py')


def get_config(arg=None):
  """Every run starts from configs/ra_shakespeare_char.py[:ARG] ('', 'smoke' or 'large';
  `:routed` is the large model)."""
  return _base('large' if arg == 'routed' else arg)


BUDGETS = (1.0, 0.75, 0.5, 0.25)
SEEDS = (0, 1, 2)
# The character vocabulary of tiny_shakespeare (the FLOPs of the output head).
VOCAB = 65
DISTILL = {'activation.distill_weight': 0.5, 'activation.distill_temperature': 1.0}
VARIANTS = {
    'single': {'activation.train_mode': 'single'},
    'sandwich': {'activation.train_mode': 'sandwich'},
    'distill': {'activation.train_mode': 'sandwich', **DISTILL},
    'rule': {'activation.train_mode': 'sandwich_rule', 'activation.sandwich_random': 2, **DISTILL},
}


def model_cfg(config, vocab: int = VOCAB, **shape) -> gpt.GPTConfig:
  """The model of `config` with `shape` (model fields) changed, on a `vocab`-token vocabulary."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(shape)
  return runs.make_model(config, vocab).cfg


def dense_at(config, a: float) -> dict:
  """The dense model of the RA sub-model's shape at fraction a (whole heads and units, as the
  run's buckets round a)."""
  model, act = config.model, config.activation
  width = (activation.bucket_index(a, act.buckets) + 1) / act.buckets
  heads = round(model.num_heads * width)
  # `buckets` = its head count: evaluate's truncated curve of this dense model then takes whole
  # heads (the RA base's 4 buckets do not divide 3, 2 or 1 heads).
  return {**sweeps.DENSE, 'model.num_heads': heads, 'model.mlp_dim': round(model.mlp_dim * width),
          'model.head_dim': model.get('head_dim') or model.embed_dim // model.num_heads,
          'activation.buckets': heads}


def dense_flops(config, a: float, vocab: int = VOCAB) -> float:
  """FLOPs per token of the dense model at a: also the RA sub-model's at a as exported (keys and
  values of the kept heads only)."""
  shape = {k.split('.')[1]: v for k, v in dense_at(config, a).items() if k.startswith('model.')}
  return flops.flops_per_token(model_cfg(config, vocab, **shape))


def ra_train_flops(config, overrides: dict, vocab: int = VOCAB) -> float:
  """Forward FLOPs per token of one training step of the RA run `config` + `overrides`
  (activation fields), summed over its passes, in expectation."""
  ra = config.activation.copy_and_resolve_references()
  for key, value in overrides.items():
    ra[key.split('.', 1)[1]] = value
  return activation.train_flops_per_token(ra, model_cfg(config, vocab))


def equal_flops_steps(config, a: float, variant: str | dict = 'single',
                      vocab: int = VOCAB) -> int:
  """Steps for the dense model at a to cost what `variant` (a name of VARIANTS, or its
  activation overrides) costs to train in config.num_steps (training FLOPs: forward + backward
  of every pass of a step, in expectation), to tens."""
  overrides = VARIANTS[variant] if isinstance(variant, str) else variant
  cost = ra_train_flops(config, overrides, vocab)
  return int(round(config.num_steps * cost / dense_flops(config, a, vocab), -1))


LARGE_VARIANTS = ('distill', 'rule')  # `:large`: the best modes of the default model
ROUTED_SHARE = 0.2  # `:routed`: the mixed pass's share of full-width positions


def routed_sweep():
  for seed in SEEDS:
    for routing in ('random', 'gain'):
      yield {**VARIANTS['rule'], 'activation.mixed_share': ROUTED_SHARE,
             'activation.mixed_routing': routing, 'seed': seed}


def sweep(arg=None):
  if arg == 'routed':
    yield from routed_sweep()
    return
  config = get_config(arg)
  smoke, large = arg == 'smoke', arg == 'large'
  seeds, budgets = ((0,), (1.0, 0.5)) if smoke else (SEEDS, BUDGETS)
  for seed in seeds:
    for a in budgets:
      yield {**dense_at(config, a), 'seed': seed}
    if not (smoke or large):
      for a in budgets[1:]:
        yield {**dense_at(config, a), 'num_steps': equal_flops_steps(config, a), 'seed': seed}
    for name, overrides in VARIANTS.items():
      if not large or name in LARGE_VARIANTS:
        yield {**overrides, 'seed': seed}
