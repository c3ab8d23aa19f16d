"""Policies: which width computes each token, one object per policy.

Each object serves both teacher-forced evaluation (`eval_plan`: the plan of one parallel pass
over a batch of windows, rag_jax/evaluate.py) and decoding (`decoder`: the passes that feed
tokens one at a time, rag_jax/sample.py and rag_jax/engine.py), so one piece of code chooses a
token's width in both.

  Fixed(a)                   one fixed sub-model for every token; `dense` is Fixed(1)
  Random()                   a fresh draw a = 1 - lam B per time step: index t of a sequence runs
                             activation.position_plan(key, t) = make_plan(fold_in(key, t))
  Adaptive(a, threshold)     every token at the nested width a, again at the full width where
                             a's top-1 probability is below `threshold` (`escalates`)
  Speculative(a, k, cache)   the full model's output, drafted k tokens at a time by the nested
                             width a (rag_jax/speculative.py)

Objects are frozen and hashable (static arguments of a compiled program). `make` builds one from
a name of NAMES and checks it against the run's activation settings, with one ValueError naming
the problem.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from rag_jax import activation
from rag_jax import flops
from rag_jax import plan as plan_lib
from rag_jax import router as router_lib
from rag_jax import sampling
from rag_jax.models import gpt
from rag_jax.models import submodel
from rag_jax.models import widths as widths_lib

PAD = 0  # the token written after a sequence's last one
DRAFT_CACHES = ('shared', 'separate')  # speculative: the draft's keys and values
Act = ml_collections.FrozenConfigDict


def mean_fraction(plan: plan_lib.Plan | None) -> jax.Array:
  """The mean active fraction over the switched sites of a plan (1 for None)."""
  if plan is None:
    return jnp.float32(1.0)
  fractions = list(plan_lib.active_fractions(plan).values())
  return jnp.mean(jnp.stack(fractions)).astype(jnp.float32) if fractions else jnp.float32(1.0)


def _take(tree, start, length=None):
  """Entries [start] (or [start:start+length]) along the leading axis of every leaf."""
  if length is None:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, start, 0, False), tree)
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, length), tree)


@dataclasses.dataclass
class Decoder:
  """The passes of one decoding program (built while it is traced). `plan_at(t)`: the plan that
  feeds the token at index t; `plans_from(first, L)`: a prefill's plan for indices first.. ;
  `cost_N`: the active fraction of the pass that feeds index t."""
  model: gpt.GPT  # what runs: a fixed nested width runs as its smaller dense model
  variables: dict
  plan_at: Callable[[Any], Any]
  plans_from: Callable[[Any, int], Any]
  cost_N: jax.Array
  escalates: ClassVar[bool] = False  # whether a pass's rows record an escalation

  def forward(self, tokens_BxL, cache, pos, plan, read_only=False):
    return self.model.apply(self.variables, tokens_BxL, cache=cache, pos=pos, plan=plan,
                            read_only=read_only)

  def prefill(self, tokens_BxL, first):
    """Feeds tokens at indices first.. into a fresh cache at positions 0..: (logits, cache,
    escalated or None)."""
    cache = gpt.init_cache(self.model.cfg, tokens_BxL.shape[0])
    return *self.forward(tokens_BxL, cache, 0, self.plans_from(first, tokens_BxL.shape[1])), None

  def step(self, token_B, cache, pos, t, forced_B=None, prefilled_B=None):
    """Feeds the token at index t (position `pos`): (logits B x V, cache, escalated or None)."""
    del forced_B, prefilled_B
    logits_Bx1xV, cache = self.forward(token_B[:, None], cache, pos, self.plan_at(t))
    return logits_Bx1xV[:, 0], cache, None


@dataclasses.dataclass(frozen=True)
class Policy:
  """What every policy has: its activation settings (None: a dense run)."""
  name: ClassVar[str]
  act: Act | None = None

  def eval_plan(self, key: jax.Array, cfg, batch: int, length: int) -> plan_lib.Plan | None:
    """The plan of a teacher-forced pass over [batch, length] positions (None: dense)."""
    del key, cfg, batch, length
    return None

  def decoder(self, params, model: gpt.GPT, key: jax.Array, num_indices: int) -> Decoder:
    """The passes that decode `num_indices` indices with the activation key `key`."""
    del key
    return Decoder(model, {'params': params}, lambda t: None, lambda first, L: None,
                   jnp.ones((num_indices,), jnp.float32))

  def describe(self) -> str:
    return self.name

  def relative_flops(self, cfg, escalated: float | None = None) -> float | None:
    """FLOPs per generated token against the dense model's (flops.flops_per_token): a fixed
    width's; the expectation over draws (random); adaptive's narrow pass plus its `escalated`
    share of full passes. None for speculative (its cost is in passes)."""
    if self.act is None:
      return 1.0
    fraction = getattr(self, 'fraction', None)
    narrow = flops.flops_per_token(cfg, **activation.compute_fractions(self.act, cfg, fraction))
    return narrow / flops.flops_per_token(cfg) + (escalated or 0.0)


@dataclasses.dataclass(frozen=True)
class Fixed(Policy):
  """One sub-model for every token: widths at `fraction` (units chosen by the key for random
  and bernoulli structures); a nested one runs as the smaller dense model it is."""
  name: ClassVar[str] = 'fixed'
  fraction: float = 1.0

  @property
  def is_dense(self) -> bool:
    """No plan: a dense run's policy, or the full width of a nested one."""
    return self.act is None or (self.fraction == 1.0 and self.act.structure == 'nested')

  def plan(self, key, cfg) -> plan_lib.Plan | None:
    if self.is_dense:
      return None
    return activation.make_plan(key, self.act, cfg, fraction=self.fraction)

  def eval_plan(self, key, cfg, batch, length):
    del batch, length
    return self.plan(key, cfg)

  def decoder(self, params, model, key, num_indices):
    plan = self.plan(key, model.cfg)
    cost_N = jnp.full((num_indices,), mean_fraction(plan))
    if plan is not None and self.act.structure == 'nested':
      # The smaller dense model computes and caches the keys and values of its own heads only.
      params, model = submodel.submodel(params, model, plan)
      plan = None
    return Decoder(model, {'params': params}, lambda t: plan, lambda first, L: plan, cost_N)

  def describe(self):
    return f'fixed {self.fraction:g}'


@dataclasses.dataclass(frozen=True)
class Random(Policy):
  """A fresh draw per time step: the token at index t runs activation.position_plan(key, t),
  in decoding and in evaluation."""
  name: ClassVar[str] = 'random'

  def eval_plan(self, key, cfg, batch, length):
    """Row b of the batch draws with split(key, batch)[b], position t with
    activation.position_plan, as decoding that row alone from position 0 does (as masks, so
    that positions differ in one pass)."""
    return jax.vmap(lambda k: activation.per_position_plan(k, self.act, cfg, length))(
        jax.random.split(key, batch))

  def decoder(self, params, model, key, num_indices):
    act, cfg = self.act, model.cfg
    # One vectorised draw of every index's plan, compiled once; prefills take theirs as masks.
    table = jax.vmap(lambda t: activation.position_plan(key, act, cfg, t))(
        jnp.arange(num_indices))
    if act.structure == 'nested':
      # Drawn nested widths read their weights from separate prefix arrays, cut once here: a
      # slice of one array inside the loop would be copied at every step.
      variables = widths_lib.decode_variables(params, act.buckets, range(act.buckets),
                                              activation.parse_sites(act.sites))
    else:
      variables = {'params': params}
    return Decoder(model, variables, lambda t: _take(table, t),
                   lambda first, L: jax.vmap(plan_lib.as_masks)(_take(table, first, L)),
                   jax.vmap(mean_fraction)(table))


@dataclasses.dataclass
class AdaptiveDecoder(Decoder):
  """`adaptive`: the narrow width, then the full width for the rows below the threshold."""
  policy: Any = None
  narrow: Any = None
  escalates: ClassVar[bool] = True

  def prefill(self, tokens_BxL, first, length=None):
    """A narrow pass, then one pass with every position at its chosen width (masks), as
    `evaluate --policy=adaptive` scores. `length`: positions from it on are padding (the
    engine's padded prompts), which never escalate."""
    del first
    cache = gpt.init_cache(self.model.cfg, tokens_BxL.shape[0])
    logits_BxLxV, narrow_cache, escalate_BxL = self.narrow_forward(tokens_BxL, cache, 0)
    if length is not None:
      escalate_BxL &= jnp.arange(tokens_BxL.shape[1]) < length
    masks = plan_lib.escalate(plan_lib.as_masks(self.narrow), escalate_BxL)
    return *jax.lax.cond(jnp.any(escalate_BxL),
                         lambda: self.forward(tokens_BxL, cache, 0, masks),
                         lambda: (logits_BxLxV, narrow_cache)), escalate_BxL

  def narrow_forward(self, tokens_BxL, cache, pos, read_only=False):
    """The narrow pass: (logits, cache, escalate) with the policy's decision per position (from
    the final hidden state too when a router decides)."""
    if self.policy.router is None:
      logits, cache = self.forward(tokens_BxL, cache, pos, self.narrow, read_only)
      return logits, cache, self.policy.escalates(logits)
    (logits, cache), hidden = router_lib.apply_with_hidden(
        self.model, self.variables, tokens_BxL, cache=cache, pos=pos, plan=self.narrow,
        read_only=read_only)
    return logits, cache, self.policy.escalates(logits, hidden)

  def step(self, token_B, cache, pos, t, forced_B=None, prefilled_B=None):
    """One token: each row keeps the keys and values of the width it ran at. A prompt token
    (`forced_B`) takes the width the prefill chose for it (`prefilled_B`), so a row's widths do
    not depend on the other rows' prompts."""
    del t
    logits_Bx1xV, narrow_kv, escalate_Bx1 = self.narrow_forward(token_B[:, None], cache, pos,
                                                                 read_only=True)
    logits_BxV, escalate_B = logits_Bx1xV[:, 0], escalate_Bx1[:, 0]
    if forced_B is not None:
      escalate_B = jnp.where(forced_B, prefilled_B, escalate_B)

    def full():  # the escalated rows' logits and keys and values, the others' narrow ones
      full_Bx1xV, full_kv = self.forward(token_B[:, None], cache, pos, None, True)
      pick = lambda f, n: jnp.where(escalate_B.reshape((-1,) + (1,) * (f.ndim - 1)), f, n)
      return pick(full_Bx1xV[:, 0], logits_BxV), jax.tree.map(pick, full_kv, narrow_kv)

    logits_BxV, new_kv = jax.lax.cond(jnp.any(escalate_B), full, lambda: (logits_BxV, narrow_kv))
    return logits_BxV, gpt.write_cache(cache, new_kv, pos), escalate_B


@dataclasses.dataclass(frozen=True)
class Adaptive(Policy):
  """Every token at the nested width `fraction`, escalated to the full width where that width's
  top-1 probability is below `threshold` (0: never; above 1: always); with a `router`
  (rag_jax/router.py), where the router's predicted gain of the full width, in nats, is above
  `threshold` instead."""
  name: ClassVar[str] = 'adaptive'
  fraction: float = 0.5
  threshold: float = 0.5
  router: router_lib.Router | None = None

  def signal(self, logits, hidden=None) -> jax.Array:
    """Per position, how much the full width is wanted (escalate above `cutoff`): the router's
    predicted gain, or minus the narrow width's top-1 probability."""
    if self.router is None:
      return -sampling.confidence(logits)
    return self.router.gain(hidden, logits)

  def cutoff(self, threshold: float) -> float:
    return threshold if self.router is not None else -threshold

  def escalates(self, logits, hidden=None) -> jax.Array:
    """Which predictions escalate (the same code in decoding and in evaluation)."""
    return self.signal(logits, hidden) > self.cutoff(self.threshold)

  def check_threshold(self, threshold) -> float:
    """`threshold` as a float, or one ValueError: with a router a predicted gain in nats (any
    finite number), else a top-1 probability (>= 0; 0: never escalate, above 1: always). The
    one rule for the command line, the engine and a server request."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
      raise ValueError(f'threshold must be a number, got {threshold!r}.')
    if self.router is not None:
      if not math.isfinite(threshold):
        raise ValueError(f'threshold (a predicted gain in nats) must be finite, got {threshold}.')
    elif not threshold >= 0:
      raise ValueError(f'threshold must be >= 0 (a top-1 probability; 0: never escalate, above '
                       f'1: always), got {threshold}.')
    return float(threshold)

  def narrow(self, cfg, key=None) -> plan_lib.Plan:
    key = jax.random.key(0) if key is None else key  # a nested width: the key chooses nothing
    return activation.make_plan(key, self.act, cfg, fraction=self.fraction)

  def eval_plans(self, signal_BxL, cfg, threshold) -> tuple[jax.Array, plan_lib.Plan]:
    """(escalated [B, L], the second pass's plan) from the narrow pass's `signal` at a
    threshold (evaluate scores several in one pass)."""
    escalate_BxL = signal_BxL > self.cutoff(threshold)
    return escalate_BxL, plan_lib.escalate(plan_lib.as_masks(self.narrow(cfg)), escalate_BxL)

  def eval_plan(self, key, cfg, batch, length):
    del key, batch, length
    return self.narrow(cfg)  # the first pass; `eval_plans` gives the second

  def decoder(self, params, model, key, num_indices):
    act, narrow = self.act, self.narrow(model.cfg, key)
    # The narrow width's and the full width's weights as separate prefix arrays.
    buckets = {act.buckets - 1} | {site.bucket for layer in narrow
                                   for site in (layer.mlp, layer.heads) if site is not None}
    variables = widths_lib.decode_variables(params, act.buckets, sorted(buckets),
                                            activation.parse_sites(act.sites))
    return AdaptiveDecoder(model, variables, lambda t: narrow, lambda first, L: narrow,
                           jnp.full((num_indices,), mean_fraction(narrow)), policy=self,
                           narrow=narrow)

  def describe(self):
    return f'adaptive {self.fraction:g} @ {self.threshold:g}{" router" if self.router else ""}'


@dataclasses.dataclass(frozen=True)
class Speculative(Policy):
  """The full model's output, drafted `draft_tokens` at a time by the nested width `fraction`
  (rag_jax/speculative.py runs it); a teacher-forced pass scores the full model."""
  name: ClassVar[str] = 'speculative'
  fraction: float = 0.5
  draft_tokens: int = 4
  draft_cache: str = 'shared'

  def describe(self):
    return f'speculative {self.fraction:g} k={self.draft_tokens}'

  def relative_flops(self, cfg, escalated=None):
    return None


POLICIES = {p.name: p for p in (Fixed, Random, Adaptive, Speculative)}
NAMES = ('dense',) + tuple(POLICIES)  # `dense`: fixed at 1
EVALUATED = ('fixed', 'random', 'adaptive')  # what evaluate scores (speculative: the full model)


def make(name: str, act=None, model=None, *, fraction: float | None = None,
         threshold: float = 0.5, draft_tokens: int = 4, draft_cache: str = 'shared',
         router: router_lib.Router | None = None) -> Policy:
  """The policy `name` for a run's activation settings `act` (and its `model` config, to check
  them), or one ValueError naming the problem. `fraction`: fixed's width, adaptive's and
  speculative's narrow width."""
  if name not in NAMES:
    raise ValueError(f'policy must be one of {NAMES}, got {name!r}.')
  if name == 'dense':
    return Fixed(act=None, fraction=1.0)
  if name == 'fixed' and not (fraction is not None and 0 < fraction <= 1):
    raise ValueError(f'policy fixed needs --active_fraction (active_fraction=) in (0, 1], got '
                     f'{fraction}.')
  if name == 'random' and fraction is not None:
    raise ValueError(f'--active_fraction (active_fraction=) goes with policy fixed, not {name}.')
  if act is None:
    raise ValueError(f'policy {name} needs the activation settings (`act`).')
  if model is not None:
    activation.validate(act, model)
  act = act if isinstance(act, Act) else Act(act)
  if name == 'fixed':
    return Fixed(act=act, fraction=float(fraction))
  if name == 'random':
    activation.check_draws(act, 'policy random would generate with the dense model')
    return Random(act=act)
  fraction = 0.5 if fraction is None else float(fraction)
  if name == 'speculative':  # checked against the prompt and the context: speculative.check
    return Speculative(act=act, fraction=fraction, draft_tokens=draft_tokens,
                       draft_cache=draft_cache)
  if act.structure != 'nested':
    raise ValueError("policy adaptive escalates from a nested width; the run's structure is "
                     f'{act.structure!r}.')
  if not 0 < fraction < 1:
    raise ValueError(f'policy adaptive needs a draft_fraction in (0, 1), got {fraction}.')
  if router is not None and router.fraction != fraction:
    raise ValueError(f'the router routes from the width {router.fraction:g}; give '
                     f'draft_fraction={router.fraction:g}, not {fraction:g}.')
  policy = Adaptive(act=act, fraction=fraction, threshold=threshold, router=router)
  return dataclasses.replace(policy, threshold=policy.check_threshold(threshold))
