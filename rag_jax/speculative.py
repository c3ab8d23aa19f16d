"""Self-speculative decoding: the model's own narrow width drafts, the full width verifies.

A nested random-activation model holds a good narrow sub-model (its fixed width at a, sliced
out as `submodel.submodel` slices it). Each iteration of one compiled loop:

1. **Draft.** The narrow model proposes k tokens d_1..d_k, one at a time (greedy, or drawn
   from its processed distribution q under the same temperature / top-k / top-p).
2. **Verify.** The full model feeds the last committed token and d_1..d_k in one parallel pass
   of k + 1 positions against its KV cache: p_0..p_k.
3. **Accept.** Greedy: the longest prefix with d_i = argmax p_{i-1}, then argmax p_m from the
   full model. Sampling: d_i is kept with probability min(1, p(d_i) / q(d_i)); at the first
   rejection a token is drawn from the normalised max(0, p - q), and after k acceptances from
   p_k (Leviathan et al. 2023; Chen et al. 2023). The output therefore follows the full model's
   distribution; greedy output is the full model's greedy text.

So every iteration commits between 1 and k + 1 tokens for one full-width pass of k + 1
positions and k (or k + 1) narrow steps.

The draft's keys and values (`draft_cache`):
* `separate`: the draft keeps a cache of its own, of its own heads and blocks (smaller); its
  entries are the narrow model's. It feeds the k-th draft token too (k + 1 narrow steps), so
  that the cache is complete when all k are accepted.
* `shared` (MatFormer's "shared attention cache"): the draft reads the full model's keys and
  values of its heads and blocks (computed by the verifying passes from the full model's own
  residual stream) and writes its speculative positions into a copy taken per iteration; the
  full model's pass then writes the committed positions. No second cache to keep in step.

Rows: every row runs its own loop state (`jax.vmap` over rows): its own position, cache and
count of accepted tokens; the loop ends when the slowest row has its tokens, and a finished
row's later iterations are discarded. Row b's randomness at an iteration is
fold_in(row key, committed length), so a row's text does not depend on the batch.
Context: the plain sampler's rule (rag_jax/decode.py). When the next token would land at
position T the caches are rebuilt from the last T//2 tokens; where a verifying pass of k + 1
positions would pass position T - 1, the full model decodes alone, one token per pass, so every
token sees the context it sees in plain sampling (greedy output is the full model's greedy text
at any length). Only `nested` structures draft (a fixed width of a `random` structure is not a
prefix), and k stays below T//2.
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import ml_collections

from rag_jax import activation
from rag_jax import policies
from rag_jax import sampling
from rag_jax.models import gpt
from rag_jax.models import submodel

DRAFT_CACHES = policies.DRAFT_CACHES
PAD = policies.PAD


@flax.struct.dataclass
class RowState:
  tokens: jax.Array      # [buffer]: prompt, committed tokens, PAD
  n: jax.Array           # committed tokens (the prompt included)
  offset: jax.Array      # index - cache position (0 until the first context rebuild)
  cache: gpt.Cache       # the full model's (batch 1): the committed tokens before index n - 1
  draft_cache: gpt.Cache | None  # `separate` only
  done: jax.Array
  proposed: jax.Array    # draft tokens proposed so far
  accepted: jax.Array    # of them accepted
  iterations: jax.Array


def check(cfg: gpt.GPTConfig, act, prompt_length: int, num_tokens: int, draft_fraction: float,
          draft_tokens: int, draft_cache: str) -> None:
  """ValueError naming what cannot be drafted, before anything compiles."""
  if act is None or not act.enabled or act.structure != 'nested':
    raise ValueError('policy speculative drafts with a nested width of the run: it needs a '
                     "random-activation run with structure 'nested'.")
  if not 0 < draft_fraction < 1:
    raise ValueError(f'--draft_fraction must be in (0, 1), got {draft_fraction}.')
  submodel.check_fraction(act, cfg, draft_fraction, flag='--draft_fraction')
  if not isinstance(draft_tokens, int) or draft_tokens < 1:
    raise ValueError(f'--draft_tokens must be a positive integer, got {draft_tokens!r}.')
  if draft_cache not in DRAFT_CACHES:
    raise ValueError(f'--draft_cache must be one of {DRAFT_CACHES}, got {draft_cache!r}.')
  if draft_tokens >= cfg.block_size // 2:
    raise ValueError(f'--draft_tokens ({draft_tokens}) must be below half the context '
                     f'({cfg.block_size // 2}): a verifying pass fits after a context rebuild.')


@dataclasses.dataclass
class _Models:
  """The full model and the draft, and how one row decodes (static for one program)."""
  full_model: gpt.GPT
  full_params: dict
  draft_model: gpt.GPT
  draft_params: dict
  kept_layers: list[int]  # the full model's blocks the draft keeps
  shared: bool            # draft_cache == 'shared'
  k: int
  temperature: float
  top_k: int
  top_p: float
  greedy: bool

  def full(self, tokens_1xL, cache, pos):
    return self.full_model.apply({'params': self.full_params}, tokens_1xL, cache=cache, pos=pos)

  def draft(self, tokens_1xL, cache, pos):
    return self.draft_model.apply({'params': self.draft_params}, tokens_1xL, cache=cache,
                                  pos=pos)

  def draft_cache_of(self, s: RowState):
    """The draft's keys and values: its own, or the full model's of its blocks and heads."""
    if not self.shared:
      return s.draft_cache
    h = self.draft_model.cfg.num_heads
    return [{'k': s.cache[l]['k'][:, :, :h], 'v': s.cache[l]['v'][:, :, :h]}
            for l in self.kept_layers]

  def probs(self, logits_V):
    return jax.nn.softmax(sampling.processed_logits(logits_V[None], self.temperature,
                                                    self.top_k, self.top_p)[0])

  def pick(self, logits_V, key):
    return sampling.sample_token(logits_V[None], key, self.temperature, self.top_k, self.top_p,
                                 self.greedy)[0]


def _accept(m: _Models, d_k, q_logits_kxV, p_logits, accept_keys, last_key):
  """(accepted drafts m, the token after them) from the drafts d_1..d_k, their draft logits and
  the full model's logits p_0..p_k (module docstring, step 3)."""
  k = m.k
  if m.greedy:
    target = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)
    count = jnp.sum(jnp.cumprod((d_k == target[:k]).astype(jnp.int32)))
    return count, target[count]
  p = jax.vmap(m.probs)(p_logits)             # [k + 1, V]
  q = jax.vmap(m.probs)(q_logits_kxV)         # [k, V]
  p_d = jnp.take_along_axis(p[:k], d_k[:, None], 1)[:, 0]
  q_d = jnp.take_along_axis(q, d_k[:, None], 1)[:, 0]
  u = jax.vmap(lambda key: jax.random.uniform(key))(accept_keys)
  ok = u * q_d < p_d                          # u < p/q without dividing by q
  count = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
  p_m = p[count]
  q_m = jnp.concatenate([q, jnp.zeros_like(q[:1])])[count]  # q after k acceptances: 0
  residual = jnp.maximum(p_m - q_m, 0.0)
  residual = jnp.where(residual.sum() > 0, residual, p_m)
  return count, jax.random.categorical(last_key, jnp.log(residual)).astype(jnp.int32)


def _speculate(m: _Models, s: RowState, row_key):
  """One iteration: k drafts, one verifying pass, the accepted ones and the next token. Returns
  (state with the caches updated, drafts accepted, the k + 1 candidate tokens)."""
  k = m.k
  keys = jax.random.split(jax.random.fold_in(row_key, s.n), 2 * k + 1)
  draft_keys, accept_keys, last_key = keys[:k], keys[k:2 * k], keys[2 * k]
  last = jax.lax.dynamic_index_in_dim(s.tokens, s.n - 1, 0, False)
  pos = s.n - 1 - s.offset  # the cache position `last` is fed at

  def draft_step(carry, j):
    c, token = carry
    logits, c = m.draft(token[None, None], c, pos + j)
    d = m.pick(logits[0, 0], draft_keys[j])
    return (c, d), (d, logits[0, 0])

  (d_cache, d_last), (d_k, q_logits_kxV) = jax.lax.scan(
      draft_step, (m.draft_cache_of(s), last), jnp.arange(k))
  if not m.shared:  # the k-th draft token's keys and values, for when all k are accepted
    d_cache = m.draft(d_last[None, None], d_cache, pos + k)[1]
  p_logits, cache = m.full(jnp.concatenate([last[None], d_k])[None], s.cache, pos)
  count, next_token = _accept(m, d_k, q_logits_kxV, p_logits[0], accept_keys, last_key)
  candidates = jnp.where(jnp.arange(k + 1) < count, jnp.concatenate([d_k, d_k[:1]]), next_token)
  return (s.replace(cache=cache, draft_cache=None if m.shared else d_cache,
                    proposed=s.proposed + k, accepted=s.accepted + count), count, candidates)


def _plain(m: _Models, s: RowState, row_key):
  """One token from the full model alone (near the end of the context, where k drafts would
  not fit): what plain sampling computes."""
  last = jax.lax.dynamic_index_in_dim(s.tokens, s.n - 1, 0, False)
  pos = s.n - 1 - s.offset
  logits, cache = m.full(last[None, None], s.cache, pos)
  d_cache = None if m.shared else m.draft(last[None, None], s.draft_cache, pos)[1]
  token = m.pick(logits[0, 0], jax.random.fold_in(row_key, s.n))
  return (s.replace(cache=cache, draft_cache=d_cache), jnp.int32(0),
          jnp.full((m.k + 1,), token, jnp.int32))


def _rebuild(m: _Models, s: RowState) -> RowState:
  """The plain sampler's context rule: when the next token would land at position T, the caches
  are rebuilt from the T//2 - 1 tokens before it (positions 0..), and it lands at T//2 - 1."""
  T = m.full_model.cfg.block_size
  keep = gpt.rebuild_keep(T)
  recent = jax.lax.dynamic_slice_in_dim(s.tokens, s.n - 1 - keep, keep)[None]
  cache = gpt.init_cache(m.full_model.cfg, 1)
  d_cache = None if m.shared else gpt.init_cache(m.draft_model.cfg, 1)
  if keep:
    cache = m.full(recent, cache, 0)[1]
    d_cache = None if m.shared else m.draft(recent, d_cache, 0)[1]
  return s.replace(cache=cache, draft_cache=d_cache, offset=s.n - 1 - keep)


def generate(params, model: gpt.GPT, prompt_BxP: jax.Array, key: jax.Array,
             lengths_B: jax.Array, sample_ids_B: jax.Array, *, num_tokens: int,
             temperature: float, top_k: int, top_p: float, greedy: bool, end_token: int | None,
             act: ml_collections.FrozenConfigDict, draft_fraction: float, draft_tokens: int,
             draft_cache: str) -> tuple[jax.Array, jax.Array]:
  """Tokens B x (P + num_tokens) as `decode.generate` returns them, and per row
  [iterations, draft tokens proposed, accepted] (int32, B x 3)."""
  cfg, k = model.cfg, draft_tokens
  B, P = prompt_BxP.shape
  N, T = P + num_tokens, cfg.block_size
  token_key, act_key = jax.random.split(key)
  row_keys_B = jax.vmap(lambda i: jax.random.fold_in(token_key, i))(sample_ids_B)
  plan = activation.make_plan(act_key, act, cfg, fraction=draft_fraction)
  d_params, d_model = submodel.submodel(params, model, plan)
  m = _Models(model, params, d_model, d_params,
              [b['layer'] for b in submodel.kept_units(plan, cfg)], draft_cache == 'shared', k,
              temperature, top_k, top_p, greedy)

  def row(prompt_P, length, row_key):
    limit = length + num_tokens
    tokens = jnp.full((N + k + 1,), PAD, jnp.int32).at[:P].set(
        jnp.where(jnp.arange(P) < length, prompt_P, PAD))
    _, cache = m.full(prompt_P[None], gpt.init_cache(cfg, 1), 0)
    d_cache = None if m.shared else m.draft(prompt_P[None], gpt.init_cache(d_model.cfg, 1), 0)[1]
    zero = jnp.int32(0)
    state = RowState(tokens=tokens, n=length, offset=zero, cache=cache, draft_cache=d_cache,
                     done=length >= limit, proposed=zero, accepted=zero, iterations=zero)

    def body(s: RowState) -> RowState:
      if N + k <= T:  # every verifying pass fits the context: no rebuild, no plain steps
        s, accepted, candidates = _speculate(m, s, row_key)
      else:
        s = jax.lax.cond(s.n - 1 - s.offset >= T, lambda: _rebuild(m, s), lambda: s)
        fits = s.n - 1 - s.offset + k <= T - 1  # the verifying pass's last position
        s, accepted, candidates = jax.lax.cond(fits, lambda: _speculate(m, s, row_key),
                                               lambda: _plain(m, s, row_key))
      # Commit d_1..d_m and the next token: positions n..n+m, cut at the end token and limit.
      index = jnp.arange(k + 1)
      count = jnp.minimum(accepted + 1, limit - s.n)
      hit = jnp.zeros((k + 1,), bool)
      if end_token is not None:
        hit = (candidates == end_token) & (index < count)
        count = jnp.where(hit.any(), jnp.argmax(hit) + 1, count)
      new = jnp.where(index < count, candidates, PAD)
      n = s.n + count
      return s.replace(tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, new, s.n, 0), n=n,
                       done=(n >= limit) | hit.any(), iterations=s.iterations + 1)

    final = jax.lax.while_loop(lambda s: ~s.done, body, state)
    return final.tokens[:N], jnp.stack([final.iterations, final.proposed, final.accepted])

  if B == 1:  # one row: no vmap (its batched positions would turn cache writes into scatters)
    return jax.tree.map(lambda x: x[None], row(prompt_BxP[0], lengths_B[0], row_keys_B[0]))
  return jax.vmap(row)(prompt_BxP, lengths_B, row_keys_B)
