"""Random activation (docs/design.md §1): which part of the network is on, as pure functions of
keys.

A draw gives the active fraction

    a = max(1 - lam * B, min_active),   B ~ Beta(alpha, beta),

which is rounded *up* to one of `buckets` widths k = d * j / buckets (j = 1..buckets) of a
width-d site (`mlp`: hidden units; `heads`: attention heads). For `layers`, a fraction keeps
ceil(a * num_layers) whole blocks. Which units are on:

  nested     the first k (any prefix is a valid smaller model);
  random     a uniformly random k-subset (units perm[:k] of a random permutation);
  bernoulli  each unit independently with probability a, as a 0/1 mask (no compute saved).

Which whole blocks are on (`layer_schedule`, the `layers` site):

  structure  as `structure` says: nested keeps the first k blocks (an early exit), random a
             uniformly random k-subset, bernoulli gates each block;
  spaced     LayerDrop (Fan et al. 2019): a drawn k drops a uniformly random subset in training;
             a fixed fraction keeps k evenly spaced blocks, the first and the last among them;
  rising     LayerSkip (Elhoushi et al. 2024): a drawn k drops blocks with rates rising
             linearly with depth (block l weighted l / (L - 1), the first never dropped); a fixed
             fraction keeps the first k blocks (an early exit, as LayerSkip decodes). Keeping
             evenly spaced blocks instead measured 0.013-0.023 nats worse at a = 0.75 and 0.5
             (experiments/depth_keep.py, 3 seeds): the blocks training drops least are the first.

`make_plan` turns a key (and optionally a fixed fraction) into a typed `plan.Plan`: static
widths for a fixed fraction, drawn widths for a draw, masks for `bernoulli`; `per_position_plan`
gives every position its own draw, as masks. `compute_fractions` is the compute that runs.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.special

from rag_jax import flops
from rag_jax import plan as plan_lib
from rag_jax.errors import ConfigError

SITES = ('mlp', 'heads', 'layers')
STRUCTURES = ('nested', 'random', 'bernoulli')
# 'single': one drawn width per step. 'sandwich': the full width and one drawn width.
# 'sandwich_rule' (US-Nets): the full width, the smallest width (max(1 - lam, min_active)) and
# `sandwich_random` drawn widths. In both sandwich modes the narrow widths may also learn from the
# full width's detached predictions (in-place distillation: `distill_weight`,
# `distill_temperature`).
TRAIN_MODES = ('single', 'sandwich', 'sandwich_rule')
# How a forward pass chooses what is on: `dense` (everything), `fixed` (one static fraction for
# the whole pass or generation), `random` (a fresh draw at every time step). `evaluate` scores
# `fixed` and `random` (a dense run at fraction 1 is the dense model); `sample` takes all three.
POLICIES = ('dense', 'fixed', 'random')
LAYER_SCHEDULES = ('structure', 'spaced', 'rising')
MIXED_ROUTINGS = ('random', 'gain')  # which positions the mixed pass escalates (mixed_routing)


def default_config() -> ml_collections.ConfigDict:
  """config.activation; `enabled=False` is the dense model."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.alpha = 1.0          # Beta(alpha, beta) shape of the switched-off fraction B.
  c.beta = 1.0
  c.lam = 0.0            # the fraction switched off is lam * B; 0 = dense.
  c.sites = 'mlp,heads'  # any of mlp, heads, layers, comma-separated.
  c.structure = 'nested'
  c.buckets = 4          # static widths d/buckets, 2d/buckets, ..., d.
  c.per_layer = True     # one draw per layer (True) or one per step for all layers.
  c.layer_schedule = 'structure'  # which blocks the `layers` site keeps: see LAYER_SCHEDULES.
  c.rescale = False      # scale a site's output by d/k (inverted-dropout style).
  c.min_active = 0.0     # floor on the drawn fraction.
  c.train_mode = 'single'  # 'single', 'sandwich' (full + drawn), 'sandwich_rule' (see TRAIN_MODES).
  c.sandwich_random = 2    # sandwich_rule: drawn widths per step beside the smallest and the full.
  # Narrow widths' loss: (1 - w) * CE(labels) + w * T^2 * KL(full || narrow).
  c.distill_weight = 0.0
  c.distill_temperature = 1.0
  # Sandwich modes: the narrow passes' objectives weigh this much beside the full width's
  # (1 = a plain sum; above 1 favours the sub-models, below 1 the full model).
  c.narrow_weight = 1.0
  # Steps at the start that train the full width alone (a dense warm-up), before any draw.
  c.full_warmup_steps = 0
  # At the warm-up's end, order every layer's MLP units and heads by importance (the parameters
  # and the optimizer's moments alike: the same function), so the nested widths start from the
  # best prefix, as the teacher path's config.init_reorder does for a trained parent.
  c.warmup_reorder = False
  # Sandwich modes: one more pass per step at the smallest width with this share of the
  # positions (drawn per row and position) at the full width, so the model learns the mixed
  # contexts that policy `adaptive` decodes. It computes every unit (masks): a full pass's cost.
  c.mixed_share = 0.0
  # Which positions the mixed pass runs at the full width: 'random' (each with probability
  # mixed_share) or 'gain' (in each window the mixed_share of positions with the largest
  # expected gain KL(full || smallest) of this step's two passes, detached: top-k routing as in
  # Mixture-of-Depths, by the signal a learned router is fitted to; `sandwich_rule` only).
  c.mixed_routing = 'random'
  return c


# Fields added after runs were saved without them (configuration.ADDED_FIELDS completes a loaded
# config with these defaults: the behaviour those runs had).
ADDED = ('sandwich_random', 'distill_weight', 'distill_temperature', 'narrow_weight',
         'full_warmup_steps', 'layer_schedule', 'mixed_share', 'mixed_routing', 'warmup_reorder')
DEFAULTS = ml_collections.FrozenConfigDict(default_config())


def setting(act, name: str):
  """`act.name`, or its default (default_config) for settings made without it."""
  return act[name] if name in act else DEFAULTS[name]


def check_draws(act: ml_collections.ConfigDict, what: str) -> None:
  """The `random` policy on settings that switch nothing off (lam = 0: a dense run without
  --lam) would quietly run the dense model: a ValueError saying `what` would happen instead."""
  if act.lam == 0:
    raise ValueError(f"{what}: this run's config.activation.lam is 0 (it trained dense). Give "
                     '--lam (and --alpha, --beta) to draw, or use --policy=fixed.')


def parse_sites(sites: str) -> tuple[str, ...]:
  return tuple(s.strip() for s in sites.split(',') if s.strip())


def _validate_training(act: ml_collections.ConfigDict) -> None:
  """The training mode and the settings of the sandwich modes (distillation, narrow weight,
  warm-up, mixed pass)."""
  if act.train_mode not in TRAIN_MODES:
    raise ConfigError(f'config.activation.train_mode must be one of {TRAIN_MODES}, '
                      f'got {act.train_mode!r}.')
  n = setting(act, 'sandwich_random')
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ConfigError(
        f'config.activation.sandwich_random must be a non-negative integer, got {n!r}.')
  w, t = setting(act, 'distill_weight'), setting(act, 'distill_temperature')
  if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 1:
    raise ConfigError(f'config.activation.distill_weight must be in [0, 1], got {w!r}.')
  if not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
    raise ConfigError(f'config.activation.distill_temperature must be > 0, got {t!r}.')
  nw = setting(act, 'narrow_weight')
  if (not isinstance(nw, (int, float)) or isinstance(nw, bool) or not math.isfinite(nw)
      or nw <= 0):
    raise ConfigError(f'config.activation.narrow_weight must be a finite number > 0, got {nw!r}.')
  if nw != 1.0 and act.train_mode == 'single':
    raise ConfigError('config.activation.narrow_weight weighs the narrow passes against the full '
                      "width's, which a `single` step does not have: use train_mode='sandwich' or "
                      "'sandwich_rule'.")
  warm = setting(act, 'full_warmup_steps')
  if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
    raise ConfigError('config.activation.full_warmup_steps must be a non-negative integer, got '
                      f'{warm!r}.')
  reorder = setting(act, 'warmup_reorder')
  if not isinstance(reorder, bool):
    raise ConfigError(f'config.activation.warmup_reorder must be True or False, got {reorder!r}.')
  if reorder and not (warm and act.structure == 'nested'):
    raise ConfigError('config.activation.warmup_reorder orders the units by importance at the end '
                      'of the full-width warm-up, for the nested widths that start there: set '
                      "full_warmup_steps > 0 and structure='nested'.")
  mixed = setting(act, 'mixed_share')
  if (not isinstance(mixed, (int, float)) or isinstance(mixed, bool) or not 0 <= mixed < 1):
    raise ConfigError(f'config.activation.mixed_share must be in [0, 1), got {mixed!r}.')
  if mixed and act.train_mode == 'single':
    raise ConfigError('config.activation.mixed_share adds a pass at the smallest width with some '
                      "positions at the full width, beside the full width's own pass, which a "
                      "`single` step does not have: use train_mode='sandwich' or 'sandwich_rule'.")
  routing = setting(act, 'mixed_routing')
  if routing not in MIXED_ROUTINGS:
    raise ConfigError('config.activation.mixed_routing must be one of '
                      f'{", ".join(MIXED_ROUTINGS)}, got {routing!r}.')
  if routing == 'gain' and not (mixed and act.train_mode == 'sandwich_rule'):
    raise ConfigError("config.activation.mixed_routing='gain' escalates the positions where the "
                      'full width gains most over the smallest width, which needs a mixed pass '
                      "(mixed_share > 0) and the smallest width's own pass "
                      "(train_mode='sandwich_rule').")
  if w > 0 and act.train_mode == 'single':
    raise ConfigError('config.activation.distill_weight > 0 distils the full width into the narrow '
                      "ones, which needs the full width in the step: use train_mode='sandwich' or "
                      "'sandwich_rule'.")


def validate(act: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  for name in ('alpha', 'beta'):
    value = act[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f'config.activation.{name} must be > 0 (a Beta shape), got {value!r}.')
  if not isinstance(act.lam, (int, float)) or not 0 <= act.lam <= 1:
    raise ConfigError(f'config.activation.lam must be in [0, 1], got {act.lam!r}.')
  if not isinstance(act.min_active, (int, float)) or not 0 <= act.min_active <= 1:
    raise ConfigError(f'config.activation.min_active must be in [0, 1], got {act.min_active!r}.')
  sites = parse_sites(act.sites)
  unknown = [s for s in sites if s not in SITES]
  if unknown or not sites:
    raise ConfigError(f'config.activation.sites={act.sites!r}: unknown site(s) {unknown}; '
                      f'use a comma-separated subset of {SITES}.')
  if act.structure not in STRUCTURES:
    raise ConfigError(f'config.activation.structure must be one of {STRUCTURES}, '
                      f'got {act.structure!r}.')
  schedule = setting(act, 'layer_schedule')
  if schedule not in LAYER_SCHEDULES:
    raise ConfigError(f'config.activation.layer_schedule must be one of {LAYER_SCHEDULES}, '
                      f'got {schedule!r}.')
  if schedule != 'structure' and act.structure == 'bernoulli':
    raise ConfigError(f'config.activation.layer_schedule={schedule!r} chooses which whole blocks '
                      "are skipped; structure='bernoulli' gates every block instead (nothing "
                      "is skipped). Use structure 'nested' or 'random', or "
                      "layer_schedule='structure'.")
  _validate_training(act)
  b = act.buckets
  if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
    raise ConfigError(f'config.activation.buckets must be a positive integer, got {b!r}.')
  widths = {'mlp': ('model.mlp_dim', model.mlp_dim), 'heads': ('model.num_heads', model.num_heads)}
  for site in sites:
    if site in widths and widths[site][1] % b:
      name, d = widths[site]
      raise ConfigError(f'config.activation.buckets={b} does not divide config.{name}={d} '
                        f'(site {site!r}); choose buckets that divide every width.')


# --- Draws ---------------------------------------------------------------------------------


def draw_fraction(key: jax.Array, act: ml_collections.ConfigDict, shape=()) -> jax.Array:
  """a = max(1 - lam * B, min_active), B ~ Beta(alpha, beta)."""
  b = jax.random.beta(key, act.alpha, act.beta, shape)
  return jnp.maximum(1.0 - act.lam * b, act.min_active)


def bucket_index(a, buckets: int):
  """Index j-1 of the smallest width d*j/buckets that holds a fraction `a` (rounding up).

  Works on Python floats (a static index) and on traced arrays.
  """
  if isinstance(a, (int, float)):
    return min(max(math.ceil(a * buckets - 1e-6), 1), buckets) - 1
  return jnp.clip(jnp.ceil(a * buckets - 1e-6), 1, buckets).astype(jnp.int32) - 1


def num_layers_on(a, num_layers: int):
  if isinstance(a, (int, float)):
    return min(max(math.ceil(a * num_layers - 1e-6), 1), num_layers)
  return jnp.clip(jnp.ceil(a * num_layers - 1e-6), 1, num_layers).astype(jnp.int32)




def fraction_cdf(act: ml_collections.ConfigDict, t: float) -> float:
  """P(a <= t) for a drawn fraction a = max(1 - lam * B, min_active), B ~ Beta(alpha, beta)."""
  if t >= 1.0:
    return 1.0
  if t < act.min_active or act.lam == 0 or (1.0 - t) / act.lam > 1.0:
    return 0.0
  return float(1.0 - scipy.special.betainc(act.alpha, act.beta, (1.0 - t) / act.lam))


def width_cdf(act: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """cdf[j] = P(a drawn fraction rounds up to at most (j + 1)/n of n units), as bucket_index
  rounds. A static table: α, β, λ are config constants."""
  return np.array([fraction_cdf(act, (j + 1) / n + 1e-6 / n) for j in range(n)])


def draw_width(u: jax.Array, cdf: np.ndarray) -> jax.Array:
  """The width index j (0-based) of the quantile u ~ U[0, 1): the smallest j with u <= cdf[j].

  This is bucket_index(draw_fraction(...)) in distribution, without drawing the Beta variable
  (a rejection-sampling loop for each gamma variate, which cost a fifth of a decode step on
  XLA:CPU); since it is monotone in u, one u gives one fraction's widths at every site.
  """
  return jnp.sum(u > jnp.asarray(cdf[:-1], jnp.float32), axis=-1).astype(jnp.int32)


def _site(bucket, key, act, d: int, a=None) -> plan_lib.Site:
  """The site of a static (Python int) or drawn (traced) bucket; `bernoulli` masks each unit
  with probability a instead."""
  if act.structure == 'bernoulli':
    mask = jax.random.bernoulli(key, a, (d,)).astype(jnp.float32)
    return plan_lib.UnitMask(mask, d=d, rescale=act.rescale)
  perm = jax.random.permutation(key, d) if act.structure == 'random' else None
  kind = plan_lib.StaticWidth if isinstance(bucket, int) else plan_lib.DrawnWidth
  return kind(bucket=bucket, perm=perm, d=d, buckets=act.buckets, rescale=act.rescale)


def spaced_layers(k: int, num_layers: int) -> tuple[int, ...]:
  """k of num_layers blocks evenly spaced, the first and (for k >= 2) the last among them."""
  if k >= num_layers:
    return tuple(range(num_layers))
  if k == 1:
    return (0,)
  return tuple(math.floor(i * (num_layers - 1) / (k - 1) + 0.5) for i in range(k))


def rising_drop_order(key: jax.Array, num_layers: int) -> jax.Array:
  """rank[l]: block l's place in a draw without replacement with weights l / (L - 1) (the
  first block never drawn), by Gumbel top-k. Dropping the L - k blocks of rank < L - k drops
  each with a rate rising with depth."""
  weights = np.arange(num_layers) / max(num_layers - 1, 1)
  with np.errstate(divide='ignore'):
    scores = jnp.asarray(np.log(weights), jnp.float32) + jax.random.gumbel(key, (num_layers,))
  return jnp.argsort(jnp.argsort(-scores))


def _blocks(k, key, act, num_layers: int, a=None) -> list[plan_lib.Block]:
  """Which blocks run when k of them do (`bernoulli`: each with probability a, as gates).
  A static k (a fixed fraction) keeps evenly spaced blocks under `spaced`, the first k under
  `rising`; a drawn k drops random ones (uniformly, or with rates rising with depth)."""
  schedule = setting(act, 'layer_schedule')
  if act.structure == 'bernoulli':  # the block is computed, its output gated.
    gates = jax.random.bernoulli(key, a, (num_layers,)).astype(jnp.float32)
    return [plan_lib.BlockMask(g) for g in gates]
  static = isinstance(k, int)
  if schedule == 'spaced' and static:
    kept = spaced_layers(k, num_layers)
    on = [l in kept for l in range(num_layers)]
  elif (schedule == 'rising' and static) or (schedule == 'structure' and
                                             act.structure == 'nested'):
    on = [l < k for l in range(num_layers)]  # the first k blocks
  elif schedule == 'rising':
    rank = rising_drop_order(key, num_layers)
    on = [rank[l] >= num_layers - k for l in range(num_layers)]
  else:
    rank = jnp.argsort(jax.random.permutation(key, num_layers))
    on = [rank[l] < k for l in range(num_layers)]
  return [plan_lib.StaticBlock(o) if isinstance(o, bool) else plan_lib.DrawnBlock(o) for o in on]


# The sites a per-layer plan (`rag_jax.search`) chooses widths for (a `layers` site is not).
PER_LAYER_SITES = ('mlp', 'heads')


def site_dims(cfg) -> dict[str, int]:
  return {'mlp': cfg.mlp_dim, 'heads': cfg.num_heads}


def plan_of(buckets: dict, act, cfg, static: bool = False) -> plan_lib.Plan:
  """The plan whose layer l runs bucket `buckets[site][l]` (0-based: d*(j+1)/act.buckets units)
  at each site given. `static`: StaticWidth (Python ints); else DrawnWidth (traced ints)."""
  dims, out = site_dims(cfg), []
  for l in range(cfg.num_layers):
    sites = {}
    for site in buckets:
      b = buckets[site][l]
      kind = plan_lib.StaticWidth if static else plan_lib.DrawnWidth
      sites[site] = kind(bucket=int(b) if static else b, perm=None, d=dims[site],
                         buckets=act.buckets, rescale=act.rescale)
    out.append(plan_lib.LayerPlan(**sites))
  return tuple(out)


def make_plan(key: jax.Array, act: ml_collections.ConfigDict, model_cfg,
              fraction: float | None = None) -> plan_lib.Plan:
  """What is on in every layer for one step.

  `fraction=None` draws it: one quantile u for the step (and with `per_layer` one more for each
  layer) gives the widths through the static tables of width_cdf; `bernoulli` draws the
  fractions themselves (draw_fraction). A float `fraction` fixes it, giving static widths.
  `key` also chooses the units of `random` and `bernoulli`.
  """
  sites = parse_sites(act.sites)
  L = model_cfg.num_layers
  k_frac, k_layers, k_units = jax.random.split(key, 3)
  shared = layer_a = None  # the step's fraction and each layer's (bernoulli and fixed only)
  if fraction is not None:
    shared = float(fraction)
    layer_a = [shared] * L
    buckets = [bucket_index(float(fraction), act.buckets)] * L
    layers_on = num_layers_on(float(fraction), L)
  elif act.structure == 'bernoulli':
    shared = draw_fraction(k_frac, act)
    layer_a = (list(draw_fraction(jax.random.fold_in(k_frac, 1), act, (L,))) if act.per_layer
               else [shared] * L)
    buckets, layers_on = [None] * L, None
  else:
    u = jax.random.uniform(k_frac)
    u_layer = jax.random.uniform(jax.random.fold_in(k_frac, 1), (L,)) if act.per_layer else u
    buckets = list(jnp.broadcast_to(draw_width(u_layer[..., None], width_cdf(act, act.buckets)),
                                    (L,)))
    layers_on = draw_width(u, width_cdf(act, L)) + 1
  blocks = _blocks(layers_on, k_layers, act, L, shared) if 'layers' in sites else [None] * L
  plan = []
  for l in range(L):
    k_mlp, k_heads = jax.random.split(jax.random.fold_in(k_units, l))
    a = None if layer_a is None else layer_a[l]
    plan.append(plan_lib.LayerPlan(
        mlp=_site(buckets[l], k_mlp, act, model_cfg.mlp_dim, a) if 'mlp' in sites else None,
        heads=(_site(buckets[l], k_heads, act, model_cfg.num_heads, a)
               if 'heads' in sites else None),
        block=blocks[l]))
  return tuple(plan)


def position_plan(key: jax.Array, act: ml_collections.ConfigDict, model_cfg, t) -> plan_lib.Plan:
  """The `random` policy's draw for index t of a sequence: make_plan(fold_in(key, t)). Decoding
  feeds index t through it; a parallel pass (`per_position_plan`) takes it as masks."""
  return make_plan(jax.random.fold_in(key, t), act, model_cfg)


def per_position_plan(key: jax.Array, act: ml_collections.ConfigDict, model_cfg,
                      length: int, start: int = 0) -> plan_lib.Plan:
  """A fresh draw at every position (the `random` policy), as masks over [length, d]:
  position t is `position_plan(key, t)`, so a parallel pass scores exactly what token-by-token
  generation runs."""
  return jax.vmap(lambda t: plan_lib.as_masks(position_plan(key, act, model_cfg, t)))(
      start + jnp.arange(length))


def compute_fractions(act: ml_collections.ConfigDict, model_cfg,
                      fraction: float | None = None) -> dict[str, float]:
  """Fraction of the mlp / heads / layers compute that runs: at a fixed `fraction`, or in
  expectation over draws (`fraction=None`, exact from width_cdf). `bernoulli` masks save nothing."""
  sites = parse_sites(act.sites) if act.enabled or fraction is not None else ()
  if act.structure == 'bernoulli' or not sites:
    return {'mlp': 1.0, 'heads': 1.0, 'layers': 1.0}

  def expected(n):
    if fraction is not None:
      return (bucket_index(float(fraction), n) + 1) / n
    p = np.diff(width_cdf(act, n), prepend=0.0)
    return float(np.sum(p * np.arange(1, n + 1) / n))

  width = expected(act.buckets)
  return {'mlp': width if 'mlp' in sites else 1.0, 'heads': width if 'heads' in sites else 1.0,
          'layers': expected(model_cfg.num_layers) if 'layers' in sites else 1.0}


def is_random(act) -> bool:
  """Whether a run draws its width: random activation enabled with lam > 0 (`act` is a
  ConfigDict or a config.json's 'activation' dict; None is dense)."""
  return act is not None and bool(act['enabled']) and act['lam'] > 0


def smallest_fraction(act: ml_collections.ConfigDict) -> float:
  """The narrowest fraction a draw can give: max(1 - lam, min_active)."""
  return max(1.0 - act.lam, act.min_active)


def train_passes(act: ml_collections.ConfigDict) -> list[float | None]:
  """The forward passes of one training step: a fixed fraction (1.0 = the full width) or None
  (a drawn width)."""
  if not is_random(act):
    return [1.0]
  mixed = [1.0] if setting(act, 'mixed_share') else []  # masks: every unit computed
  if act.train_mode == 'sandwich':
    return [1.0, None] + mixed
  if act.train_mode == 'sandwich_rule':
    return [1.0, smallest_fraction(act)] + [None] * setting(act, 'sandwich_random') + mixed
  return [None]


def run_train_flops_per_token(act: ml_collections.ConfigDict, model_cfg, num_steps: int) -> float:
  """Forward FLOPs per token position of a whole run of `num_steps` steps: the first
  `full_warmup_steps` at the full width alone, the rest at train_flops_per_token."""
  warm = min(setting(act, 'full_warmup_steps'), num_steps) if is_random(act) else 0
  return (warm * flops.flops_per_token(model_cfg)
          + (num_steps - warm) * train_flops_per_token(act, model_cfg))


def train_flops_per_token(act: ml_collections.ConfigDict, model_cfg) -> float:
  """Forward FLOPs per token of one training step, summed over its passes (drawn widths in
  expectation, exact from width_cdf); the backward pass adds about twice this."""
  return sum(flops.flops_per_token(model_cfg, **compute_fractions(act, model_cfg, f))
             for f in train_passes(act))
