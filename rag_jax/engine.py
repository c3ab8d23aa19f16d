"""A decode engine with slots, in the shape a server needs (JetStream's `Engine`).

    engine = Engine(params, model, act, slots=8)
    state = engine.init_state()
    prefix = engine.prefill(prompt_tokens, fraction=0.5, key=row_key, settings=Settings(...))
    state = engine.insert(prefix, state, slot=3)       # the request now decodes in slot 3
    state, tokens_S = engine.generate(state)            # one step over all slots
    prefix = engine.prefill_many(prompts, keys=keys, settings=settings_list, fraction=0.5)
    state = engine.insert_many(prefix, state, slots)    # several prompts in one program

A slot decodes at a fixed width, or (with an `adaptive` policy, rag_jax/policies.py) at that
policy's narrow width, escalating a step to the full width where the policy's signal (the narrow
width's confidence, or a router's predicted gain) passes the slot's own threshold: the same
passes, decisions and keys and values as `rag_jax.sample --policy=adaptive`.

Each slot holds one sequence with its own position, width (a fraction the run computes: a
nested bucket, or 1), sampling settings, key and length limit. `generate` feeds every live
slot's last token at that slot's own position (the model is vmapped over slots, one sequence
each) and draws each slot's next token with its own settings, so a sequence gets exactly the
tokens it gets alone, whatever the other slots hold.

Widths: a step runs one pass per width some live slot uses, over all slots, and each slot keeps
the pass of its own width (a width no slot uses is skipped by `lax.cond`). All slots at one width
cost one pass at that width; slots at k widths cost k passes. Every width computes the keys and
values of every head (only queries, attention outputs and MLP units narrow), so a slot's cache
is complete at any width and a slot can change width between steps (`set_width`: a server under
load moves slots to narrower widths).

Keys: the token at index t of a sequence (prompt tokens count) is drawn with fold_in(key, t),
`key` the sequence's own (the sampler's rule, rag_jax/sample.py). Context: positions are learned
up to T; when a token would land at position T the slot's cache is rebuilt from its last T//2
tokens (the sampler's rule).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import activation
from rag_jax import decode
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import sampling
from rag_jax.models import gpt
from rag_jax.models import widths as widths_lib

NO_END = -1  # `Settings.end_token` when no token ends a sequence


@flax.struct.dataclass
class Settings:
  """One sequence's sampling settings (or S slots' as arrays)."""
  temperature: jax.Array
  top_k: jax.Array       # 0: every token
  top_p: jax.Array       # 1: the whole mass
  greedy: jax.Array
  max_tokens: jax.Array  # tokens to generate after the prompt
  end_token: jax.Array   # NO_END, or a token that ends the sequence (and is emitted)

  @classmethod
  def make(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False, max_tokens: int = 16, end_token: int | None = None) -> Settings:
    return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.bool_(greedy),
               jnp.int32(max_tokens), jnp.int32(NO_END if end_token is None else end_token))


@flax.struct.dataclass
class DecodeState:
  """S slots (the leading axis of every field)."""
  cache: gpt.Cache        # S x T x H x K per layer
  history_SxT: jax.Array  # the token fed at each cache position
  pos: jax.Array          # S: the position the next fed token lands at
  token: jax.Array        # S: the last chosen token, fed by the next step
  index: jax.Array        # S: the index of `token` in its sequence (prompt tokens count)
  generated: jax.Array    # S: tokens chosen after the prompt, `token` included
  width: jax.Array        # S: the slot's width, an index into Engine.fractions
  adaptive: jax.Array     # S: the slot escalates to the full width by the engine's policy
  threshold: jax.Array    # S: an adaptive slot's threshold
  escalated: jax.Array    # S: `token` was chosen from the full width's pass by escalation
  key: jax.Array          # S: the sequence's sampling key
  settings: Settings
  live: jax.Array         # S: the slot holds a sequence that wants more tokens


class Engine:
  """Slots decoding one model at the widths `fractions` (default: every width the run computes:
  its nested buckets, or 1 for a dense run). `adaptive`: the policy of slots prefilled with a
  threshold (its narrow width and signal; its own threshold is only a default). Programs compile
  once per width, padded prompt length (`prompt_pad` times a power of two, at most the context:
  `lengths`) and number of rows (prefill_many, insert_many: powers of two), and once for the
  slots (generate)."""

  def __init__(self, params, model: gpt.GPT, act: ml_collections.ConfigDict | None = None, *,
               slots: int, fractions: Sequence[float] | None = None, prompt_pad: int = 16,
               adaptive: policies.Adaptive | None = None):
    cfg = model.cfg
    nested = act is not None and act.enabled and act.structure == 'nested'
    if act is not None and act.enabled and not nested:
      raise ValueError(f"the engine decodes nested widths; the run's structure is "
                       f'{act.structure!r}.')
    buckets = act.buckets if nested else 1
    fractions = tuple(float(f) for f in (fractions or [(j + 1) / buckets
                                                       for j in range(buckets)]))
    for f in fractions:
      if f != 1.0 and not (nested and abs(f * buckets - round(f * buckets)) < 1e-9 and 0 < f):
        raise ValueError(f'width {f} is not one the run computes '
                         f'({", ".join(f"{(j + 1) / buckets:g}" for j in range(buckets))}).')
    if not isinstance(slots, int) or slots < 1:
      raise ValueError(f'slots must be a positive integer, got {slots!r}.')
    self.model, self.act, self.slots, self.fractions = model, act, slots, fractions
    self.adaptive = adaptive
    self.compiled: set[tuple[int, bool, int, int]] = set()  # prefills run: (width, adaptive, R, P)
    if adaptive is not None:
      if 1.0 not in fractions or all(abs(f - adaptive.fraction) > 1e-9 for f in fractions):
        raise ValueError(f'policy adaptive escalates from {adaptive.fraction:g} to 1: both must '
                         f'be widths the engine serves ({fractions}).')
      self.full = fractions.index(1.0)
    if not isinstance(prompt_pad, int) or prompt_pad < 1:
      raise ValueError(f'prompt_pad must be a positive integer, got {prompt_pad!r}.')
    self.prompt_pad = prompt_pad  # the shortest padded prompt: one prefill per padded length
    T, pads = cfg.block_size, []
    while prompt_pad << len(pads) < T:
      pads.append(prompt_pad << len(pads))
    self._lengths = (*pads, T)
    key = jax.random.key(0)  # nested widths: the key chooses no units
    self.plans = tuple(None if f == 1.0 else activation.make_plan(key, act, cfg, fraction=f)
                       for f in fractions)
    self.variables = ({'params': params} if not nested else widths_lib.decode_variables(
        params, buckets, sorted({activation.bucket_index(f, buckets) for f in fractions}),
        activation.parse_sites(act.sites)))
    # The sampler's CPU compiler options (decode.compiler_options: a decode step's reductions
    # ran 2x slower here without them).
    jit = functools.partial(jax.jit, compiler_options=decode.compiler_options())
    self._prefill = jit(self._prefill_rows, static_argnames=('width', 'adaptive'))
    self._generate = jit(self._generate_fn, donate_argnums=1)
    self._generate_steps = jit(self._steps_fn, donate_argnums=1,
                               static_argnames=('steps', 'adaptive'))
    self._insert = jax.jit(self._insert_fn, donate_argnums=1)
    self._set_width = jax.jit(lambda s, slot, w: s.replace(width=s.width.at[slot].set(w)),
                              donate_argnums=0)
    self._free = jax.jit(lambda s, slot: s.replace(live=s.live.at[slot].set(False)),
                         donate_argnums=0)

  # The public API: host-side checks, then one compiled program each.

  def width_of(self, fraction: float) -> int:
    """The index in `fractions` of a width (ValueError when the engine does not serve it)."""
    for i, f in enumerate(self.fractions):
      if abs(f - fraction) < 1e-9:
        return i
    raise ValueError(f'width {fraction} is not one this engine serves ({self.fractions}).')

  def init_state(self) -> DecodeState:
    """Every slot empty (not live). Built by a compiled program: its buffers are distinct, as
    donating them to `insert` and `generate` requires."""
    return jax.jit(self._empty)()

  def _empty(self) -> DecodeState:
    S, T = self.slots, self.model.cfg.block_size
    zeros = jnp.zeros((S,), jnp.int32)
    settings = jax.tree.map(lambda x: jnp.broadcast_to(x, (S,)), Settings.make())
    return DecodeState(cache=gpt.init_cache(self.model.cfg, S), history_SxT=jnp.zeros(
        (S, T), jnp.int32), pos=zeros, token=zeros, index=zeros, generated=zeros, width=zeros,
        adaptive=jnp.zeros((S,), bool), threshold=jnp.zeros((S,), jnp.float32),
        escalated=jnp.zeros((S,), bool), key=jax.random.split(jax.random.key(0), S),
        settings=settings, live=jnp.zeros((S,), bool))

  def check(self, prompt: Sequence[int], fraction: float = 1.0,
            threshold: float | None = None) -> None:
    """ValueError naming what makes a request one this engine cannot prefill."""
    T = self.model.cfg.block_size
    self.width_of(fraction)
    if threshold is not None:
      if self.adaptive is None:
        raise ValueError('this engine decodes fixed widths only (no adaptive policy).')
      if abs(fraction - self.adaptive.fraction) > 1e-9:
        raise ValueError(f'policy adaptive escalates from {self.adaptive.fraction:g} here, not '
                         f'from {fraction:g}.')
      self.adaptive.check_threshold(threshold)
    if not 0 < len(prompt) <= T:
      raise ValueError(f'a prompt has 1 to {T} tokens (the context), got {len(prompt)}.')

  def prefill(self, prompt: Sequence[int], *, key: jax.Array, settings: Settings,
              fraction: float = 1.0, threshold: float | None = None) -> DecodeState:
    """A one-slot state: the prompt fed at the width `fraction` and its first token chosen;
    with a `threshold`, a slot of the engine's adaptive policy (`fraction`: its narrow width)."""
    return self.prefill_many([prompt], keys=[key], settings=[settings], fraction=fraction,
                             thresholds=None if threshold is None else [threshold])

  def prefill_many(self, prompts: Sequence[Sequence[int]], *, keys: Sequence[jax.Array],
                   settings: Sequence[Settings], fraction: float = 1.0,
                   thresholds: Sequence[float] | None = None,
                   length: int | None = None) -> DecodeState:
    """`prefill` of several prompts at one width (and policy) in one program: a state of R rows,
    R the number of prompts rounded up to a power of two (the rows after the prompts' repeat
    the first; `insert_many` leaves them out). Programs compile per R and padded length: the
    longest prompt's (`padded_length`), or `length`, one of `lengths` at least that long (to
    reuse a program already compiled)."""
    if not prompts or len(keys) != len(prompts) or len(settings) != len(prompts) or (
        thresholds is not None and len(thresholds) != len(prompts)):
      raise ValueError('give one key, settings (and threshold) per prompt, and a prompt.')
    for i, prompt in enumerate(prompts):
      self.check(prompt, fraction, None if thresholds is None else thresholds[i])
    N = len(prompts)
    R = rows_for(N)
    P = max(self.padded_length(p) for p in prompts)
    if length is not None:
      if length not in self.lengths() or length < P:
        raise ValueError(f'length {length} is not a padded length of at least {P} '
                         f'({self.lengths()}).')
      P = length
    tokens, lengths = np.zeros((R, P), np.int32), np.zeros((R,), np.int32)
    for r in range(R):
      prompt = np.asarray(prompts[r if r < N else 0], np.int32)
      tokens[r, :len(prompt)], lengths[r] = prompt, len(prompt)
    rows = lambda xs: [*xs, *[xs[0]] * (R - N)]
    settings = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows(settings))
    threshold = np.asarray(rows(thresholds or [0.0] * N), np.float32)
    width = self.width_of(fraction)
    prefix = self._prefill(self.variables, tokens, lengths, jnp.stack(rows(keys)), settings,
                           threshold, width=width, adaptive=thresholds is not None)
    self.compiled.add((width, thresholds is not None, R, P))
    return prefix

  def lengths(self) -> list[int]:
    """The padded prompt lengths: `prompt_pad` times 1, 2, 4, .. below the context, and the
    context (a prefill's cost grows with its padded length, its programs with their number)."""
    return list(self._lengths)

  def padded_length(self, prompt: Sequence[int]) -> int:
    """The length a prompt is padded to: the shortest of `lengths` that holds it."""
    return next((P for P in self._lengths if P >= len(prompt)), self._lengths[-1])

  def ready(self, fraction: float, adaptive: bool, length: int) -> list[tuple[int, int]]:
    """(rows, padded length) of the prefills at this width (policy) that have compiled and
    take prompts of padded `length`."""
    width = self.width_of(fraction)
    return sorted((R, P) for w, a, R, P in self.compiled
                  if (w, a) == (width, adaptive) and P >= length)

  def insert(self, prefix: DecodeState, state: DecodeState, slot: int) -> DecodeState:
    return self.insert_many(prefix, state, [slot])

  def insert_many(self, prefix: DecodeState, state: DecodeState,
                  slots: Sequence[int]) -> DecodeState:
    """The first len(slots) rows of a prefilled state into those slots."""
    if not all(0 <= slot < self.slots for slot in slots):
      raise ValueError(f'slots must be in [0, {self.slots}), got {list(slots)}.')
    R = prefix.live.shape[0]
    # Rows past the slots given go to slot S, which does not exist: the scatter drops them.
    return self._insert(prefix, state, np.asarray([*slots, *[self.slots] * (R - len(slots))],
                                                  np.int32))

  def generate(self, state: DecodeState) -> tuple[DecodeState, jax.Array]:
    """One step: every live slot's next token (S; the tokens of slots not live are
    meaningless), and the state after it (a slot whose sequence ended is no longer live)."""
    return self._generate(self.variables, state)

  def generate_steps(self, state: DecodeState, steps: int, adaptive: bool = True
                     ) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array]:
    """`steps` steps in one program (one round trip from the host for `steps` tokens per
    slot, as vLLM's multi-step scheduling): (state, tokens steps x S, live steps x S: whether
    the slot was live when it chose that token, escalated steps x S: whether the full width's
    pass chose it). `adaptive=False`: the caller knows that no live slot is one of the adaptive
    policy's (the scheduler does), and a program without that policy's passes runs (with them,
    a 16-slot step of the default model took 1.04x the time of an engine without the policy,
    paired medians, experiments/engine_programs.py)."""
    return self._generate_steps(self.variables, state, steps=steps,
                                adaptive=adaptive and self.adaptive is not None)

  def set_width(self, state: DecodeState, slot: int, fraction: float) -> DecodeState:
    return self._set_width(state, jnp.int32(slot), jnp.int32(self.width_of(fraction)))

  def free(self, state: DecodeState, slot: int) -> DecodeState:
    return self._free(state, jnp.int32(slot))

  # The compiled programs.

  def _pass(self, variables, plan, tokens_SxL, cache, pos_S, read_only=False):
    """Every slot's tokens at its own position, at one width (vmapped over slots): (logits,
    cache, the router's hidden state or None); `read_only` (a step): the cache is read, and
    the token's keys and values come back in its place (gpt.GPT)."""
    router = self.adaptive is not None and self.adaptive.router is not None

    def slot(tokens_L, cache, pos):
      cache_1 = jax.tree.map(lambda c: c[None], cache)
      kwargs = dict(cache=cache_1, pos=pos, plan=plan, read_only=read_only)
      (logits, new), hidden = (router_lib.apply_with_hidden(self.model, variables,
                                                            tokens_L[None], **kwargs)
                               if router else (self.model.apply(variables, tokens_L[None],
                                                                **kwargs), None))
      return logits[0], jax.tree.map(lambda c: c[0], new), None if hidden is None else hidden[0]
    return jax.vmap(slot)(tokens_SxL, cache, pos_S)

  def _forward(self, variables, tokens_SxL, cache, pos_S, width_S, live_S, read_only=False):
    """Every slot's tokens at its own positions, each slot at its own width: one pass per width
    a live slot uses, each slot keeping its width's logits, cache (`read_only`: new keys and
    values) and hidden state (slots not live: whatever a pass gives them)."""
    one = lambda plan: self._pass(variables, plan, tokens_SxL, cache, pos_S, read_only)
    if len(self.plans) == 1:
      return one(self.plans[0])
    # All live slots at one width (the common case): that width's pass alone, no selection.
    first = width_S[jnp.argmax(live_S)]
    width_S = jnp.where(live_S, width_S, first)
    return jax.lax.cond(jnp.all(width_S == first), lambda: jax.lax.switch(first, [
        lambda plan=plan: one(plan) for plan in self.plans]),
        lambda: self._mixed(one, tokens_SxL, cache, width_S))

  def _mixed(self, one, tokens_SxL, cache, width_S):
    """Slots at several widths: a pass per width in use, each slot keeping its own."""
    out = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: one(self.plans[-1])))
    for w, plan in enumerate(self.plans):
      mine_S = width_S == w
      run = lambda acc, plan=plan, mine_S=mine_S: jax.tree.map(_pick(mine_S), one(plan), acc)
      out = jax.lax.cond(jnp.any(mine_S), run, lambda acc: acc, out)
    return out

  def _choose(self, logits_SxV, state: DecodeState, index_S) -> jax.Array:
    """Each slot's token at `index_S` from its own key and settings."""
    s = state.settings
    keys_S = jax.vmap(jax.random.fold_in)(state.key, index_S)
    return sampling.sample_rows(logits_SxV, keys_S, s.temperature, s.top_k, s.top_p, s.greedy)

  def _adaptive_decoder(self, variables, threshold) -> policies.AdaptiveDecoder:
    """The adaptive policy's passes at `threshold` (a traced value: one program serves all)."""
    policy = dataclasses.replace(self.adaptive, threshold=threshold)
    narrow = self.plans[self.width_of(policy.fraction)]
    return policies.AdaptiveDecoder(self.model, variables, lambda t: narrow,
                                    lambda first, L: narrow, None, policy=policy, narrow=narrow)

  def _prefill_rows(self, variables, tokens_RxP, lengths_R, keys_R, settings_R: Settings,
                    thresholds_R, *, width: int, adaptive: bool) -> DecodeState:
    """`_prefill_fn` of each row (vmapped): a state of R rows."""
    def row(tokens_P, length, key, settings, threshold):
      one = self._prefill_fn(variables, tokens_P, length, key, settings, threshold,
                             width=width, adaptive=adaptive)
      return jax.tree.map(lambda x: x[0], one)
    return jax.vmap(row)(tokens_RxP, lengths_R, keys_R, settings_R, thresholds_R)

  def _prefill_fn(self, variables, tokens_P, length, key, settings: Settings, threshold, *,
                  width: int, adaptive: bool):
    cfg = self.model.cfg
    T = cfg.block_size
    escalated = jnp.zeros((1,), bool)
    if adaptive:  # the policy's prefill: a narrow pass, then escalated positions at full width
      logits, cache, escalate_1xP = self._adaptive_decoder(variables, threshold).prefill(
          tokens_P[None], 0, length=length)
      escalated = jax.lax.dynamic_index_in_dim(escalate_1xP, length - 1, 1)[0]
    else:
      logits, cache = self.model.apply(variables, tokens_P[None], cache=gpt.init_cache(cfg, 1),
                                       pos=0, plan=self.plans[width])
    last_V = jax.lax.dynamic_index_in_dim(logits[0], length - 1, 0, False)
    history = jnp.zeros((1, T), jnp.int32).at[0, :tokens_P.shape[0]].set(tokens_P)
    state = DecodeState(cache=cache, history_SxT=history, pos=length[None],
                        token=jnp.zeros((1,), jnp.int32), index=length[None],
                        generated=jnp.ones((1,), jnp.int32), width=jnp.int32(width)[None],
                        adaptive=jnp.full((1,), adaptive), threshold=threshold[None],
                        escalated=escalated, key=key[None],
                        settings=jax.tree.map(lambda x: x[None], settings),
                        live=jnp.ones((1,), bool))
    token = self._choose(last_V[None], state, length[None])
    return state.replace(token=token, live=self._wants_more(state, token))

  @staticmethod
  def _wants_more(state: DecodeState, token_S) -> jax.Array:
    s = state.settings
    return state.live & (state.generated < s.max_tokens) & (token_S != s.end_token)

  def _insert_fn(self, prefix: DecodeState, state: DecodeState, slots_R) -> DecodeState:
    return jax.tree.map(lambda full, rows: full.at[slots_R].set(rows, mode='drop'), state, prefix)

  def _generate_fn(self, variables, state: DecodeState, adaptive: bool = True
                   ) -> tuple[DecodeState, jax.Array]:
    """One step; `adaptive` False: without the adaptive policy's passes (no slot is adaptive)."""
    T = self.model.cfg.block_size
    adaptive = adaptive and self.adaptive is not None
    state = jax.lax.cond(jnp.any(state.live & (state.pos >= T)),
                         functools.partial(self._refill, variables, adaptive=adaptive),
                         lambda s: s, state)
    # The passes read the cache and give each slot's new keys and values, written once after
    # (in place: a cache that left a branch of the width switch was copied, at every step).
    logits_Sx1xV, new_kv, hidden = self._forward(variables, state.token[:, None], state.cache,
                                                 state.pos, state.width, state.live, True)
    escalated_S = jnp.zeros_like(state.live)
    if adaptive:  # adaptive slots whose signal passes their threshold
      logits_Sx1xV, new_kv, escalated_S = jax.lax.cond(
          jnp.any(state.live & state.adaptive), functools.partial(self._escalate, variables),
          lambda *_: (logits_Sx1xV, new_kv, escalated_S), state, logits_Sx1xV, new_kv, hidden)
    cache = jax.vmap(gpt.write_cache)(state.cache, new_kv, jnp.minimum(state.pos, T - 1))
    history = jax.vmap(lambda h, t, p: h.at[p].set(t))(state.history_SxT, state.token,
                                                       jnp.minimum(state.pos, T - 1))
    index_S = state.index + 1
    token_S = self._choose(logits_Sx1xV[:, 0], state, index_S)
    live = state.live
    step = live.astype(jnp.int32)  # slots not live stay where they are
    state = state.replace(cache=cache, history_SxT=history, pos=state.pos + step,
                          token=jnp.where(live, token_S, state.token), index=state.index + step,
                          generated=state.generated + step, escalated=escalated_S)
    return state.replace(live=self._wants_more(state, token_S)), token_S

  def _escalate(self, variables, state: DecodeState, logits_Sx1xV, new_kv, hidden):
    """The adaptive slots whose policy signal passes their threshold take the full width's
    pass of this step (logits, and the keys and values it writes)."""
    policy = self.adaptive
    escalated_S = state.live & state.adaptive & (
        policy.signal(logits_Sx1xV[:, 0], None if hidden is None else hidden[:, 0])
        > policy.cutoff(state.threshold))
    full = lambda: jax.tree.map(_pick(escalated_S), self._pass(
        variables, self.plans[self.full], state.token[:, None], state.cache, state.pos,
        True)[:2], (logits_Sx1xV, new_kv))
    logits_Sx1xV, new_kv = jax.lax.cond(jnp.any(escalated_S), full,
                                        lambda: (logits_Sx1xV, new_kv))
    return logits_Sx1xV, new_kv, escalated_S

  def _steps_fn(self, variables, state: DecodeState, *, steps: int, adaptive: bool = True):
    def step(s, _):
      live = s.live
      s, token_S = self._generate_fn(variables, s, adaptive)
      return s, (token_S, live, s.escalated)
    state, (tokens, live, escalated) = jax.lax.scan(step, state, None, length=steps)
    return state, tokens, live, escalated

  def _refill(self, variables, state: DecodeState, adaptive: bool = True) -> DecodeState:
    """Slots whose next token would land at position T: their cache rebuilt from their last
    T//2 - 1 tokens at positions 0.. (a prefill at the slot's width, or the adaptive policy's
    prefill for an adaptive slot), the token then fed at position T//2 - 1. One slot at a
    time, those that need it only: slots reach the context's end at different steps, and a
    rebuild of every slot for each one that needs it cost the default model's 16-slot engine
    a 31-token prefill of all 16 slots each time (experiments/bench_serve.py's requests run
    past the 64-token context)."""
    T = self.model.cfg.block_size
    keep = gpt.rebuild_keep(T)
    full_S = state.live & (state.pos >= T)
    recent_SxK = state.history_SxT[:, T - keep:]
    history = jnp.where(full_S[:, None], jnp.zeros_like(state.history_SxT).at[:, :keep].set(
        recent_SxK), state.history_SxT)
    cache = state.cache
    if keep:
      def one(carry):
        need_S, cache = carry
        i = jnp.argmax(need_S)
        row = lambda x: jax.lax.dynamic_index_in_dim(x, i, 0)  # keeps a leading axis of 1
        tokens_1xK = row(recent_SxK)
        fixed = lambda: self._forward(variables, tokens_1xK, gpt.init_cache(self.model.cfg, 1),
                                      jnp.zeros((1,), jnp.int32), row(state.width),
                                      jnp.ones((1,), bool))[1]
        if adaptive:  # an adaptive slot's context is rebuilt by its own policy's prefill
          fresh = jax.lax.cond(state.adaptive[i], lambda: self._adaptive_decoder(
              variables, state.threshold[i]).prefill(tokens_1xK, 0)[1], fixed)
        else:
          fresh = fixed()
        cache = jax.tree.map(lambda c, f: jax.lax.dynamic_update_index_in_dim(c, f[0], i, 0),
                             cache, fresh)
        return need_S.at[i].set(False), cache
      _, cache = jax.lax.while_loop(lambda carry: jnp.any(carry[0]), one, (full_S, cache))
    return state.replace(cache=cache, history_SxT=history, pos=jnp.where(full_S, keep, state.pos))


def rows_for(prompts: int) -> int:
  """The rows of the prefill program that takes `prompts` prompts (a power of two)."""
  return 1 << (prompts - 1).bit_length()


def _pick(mine_S):
  """(new, old) -> new in the slots `mine_S`, old elsewhere (leading axis: slots)."""
  return lambda new, old: jnp.where(mine_S.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
