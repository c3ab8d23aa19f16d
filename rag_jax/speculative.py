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
Limits: the whole generation must fit the context (prompt + num_tokens + k <= block_size: no
cache rebuild as in the plain sampler), and only `nested` structures draft (a fixed width of a
`random` structure is not a prefix).
"""
from __future__ import annotations

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
  cache: gpt.Cache       # the full model's (batch 1); positions < n - 1 hold committed tokens
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
  if prompt_length + num_tokens + draft_tokens > cfg.block_size:
    raise ValueError(
        f'policy speculative keeps the whole text in the context: prompt ({prompt_length}) + '
        f'num_tokens ({num_tokens}) + draft_tokens ({draft_tokens}) must be at most the '
        f'context {cfg.block_size}; generate fewer tokens.')


def generate(params, model: gpt.GPT, prompt_BxP: jax.Array, key: jax.Array,
             lengths_B: jax.Array, sample_ids_B: jax.Array, *, num_tokens: int,
             temperature: float, top_k: int, top_p: float, greedy: bool, end_token: int | None,
             act: ml_collections.FrozenConfigDict, draft_fraction: float, draft_tokens: int,
             draft_cache: str) -> tuple[jax.Array, jax.Array]:
  """Tokens B x (P + num_tokens) as `sample.generate` returns them, and per row
  [iterations, draft tokens proposed, accepted] (int32, B x 3)."""
  cfg, k = model.cfg, draft_tokens
  B, P = prompt_BxP.shape
  N = P + num_tokens
  token_key, act_key = jax.random.split(key)
  row_keys_B = jax.vmap(lambda i: jax.random.fold_in(token_key, i))(sample_ids_B)
  plan = activation.make_plan(act_key, act, cfg, fraction=draft_fraction)
  d_params, d_model = submodel.submodel(params, model, plan)
  kept_layers = [b['layer'] for b in submodel.kept_units(plan, cfg)]  # the draft's blocks
  h = d_model.cfg.num_heads
  shared = draft_cache == 'shared'

  def full(tokens_1xL, cache, pos):
    return model.apply({'params': params}, tokens_1xL, cache=cache, pos=pos)

  def draft(tokens_1xL, cache, pos):
    return d_model.apply({'params': d_params}, tokens_1xL, cache=cache, pos=pos)

  def probs(logits_V):
    return jax.nn.softmax(sampling.processed_logits(logits_V[None], temperature, top_k, top_p)[0])

  def pick(logits_V, key):
    return sampling.sample_token(logits_V[None], key, temperature, top_k, top_p, greedy)[0]

  def row(prompt_P, length, row_key):
    limit = length + num_tokens
    tokens = jnp.full((N + k + 1,), PAD, jnp.int32).at[:P].set(
        jnp.where(jnp.arange(P) < length, prompt_P, PAD))
    _, cache = full(prompt_P[None], gpt.init_cache(cfg, 1), 0)
    d_cache = draft(prompt_P[None], gpt.init_cache(d_model.cfg, 1), 0)[1] if not shared else None
    zero = jnp.int32(0)
    state = RowState(tokens=tokens, n=length, cache=cache, draft_cache=d_cache,
                     done=length >= limit, proposed=zero, accepted=zero, iterations=zero)

    def body(s: RowState) -> RowState:
      keys = jax.random.split(jax.random.fold_in(row_key, s.n), 2 * k + 1)
      draft_keys, accept_keys, last_key = keys[:k], keys[k:2 * k], keys[2 * k]
      last = jax.lax.dynamic_index_in_dim(s.tokens, s.n - 1, 0, False)
      if shared:  # the full model's keys and values of the draft's blocks and heads
        d_cache = [{'k': s.cache[l]['k'][:, :, :h], 'v': s.cache[l]['v'][:, :, :h]}
                   for l in kept_layers]
      else:
        d_cache = s.draft_cache

      def draft_step(carry, j):
        c, token = carry
        logits, c = draft(token[None, None], c, s.n - 1 + j)
        d = pick(logits[0, 0], draft_keys[j])
        return (c, d), (d, logits[0, 0])

      (d_cache, d_last), (d_k, q_logits_kxV) = jax.lax.scan(
          draft_step, (d_cache, last), jnp.arange(k))
      if not shared:  # the k-th draft token's keys and values, for when all k are accepted
        d_cache = draft(d_last[None, None], d_cache, s.n - 1 + k)[1]
      fed = jnp.concatenate([last[None], d_k])
      p_logits, cache = full(fed[None], s.cache, s.n - 1)
      p_logits = p_logits[0]  # [k + 1, V]: p_i predicts the token after fed[i]

      if greedy:
        target = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)
        ok = d_k == target[:k]
        m = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        next_token = target[m]
      else:
        p = jax.vmap(probs)(p_logits)             # [k + 1, V]
        q = jax.vmap(probs)(q_logits_kxV)         # [k, V]
        p_d = jnp.take_along_axis(p[:k], d_k[:, None], 1)[:, 0]
        q_d = jnp.take_along_axis(q, d_k[:, None], 1)[:, 0]
        u = jax.vmap(lambda key: jax.random.uniform(key))(accept_keys)
        ok = u * q_d < p_d                        # u < p/q without dividing by q
        m = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        p_m = p[m]
        q_m = jnp.concatenate([q, jnp.zeros_like(q[:1])])[m]  # q after k acceptances: 0
        residual = jnp.maximum(p_m - q_m, 0.0)
        residual = jnp.where(residual.sum() > 0, residual, p_m)
        next_token = jax.random.categorical(last_key, jnp.log(residual)).astype(jnp.int32)

      # Commit d_1..d_m and next_token: positions n..n+m, cut at the end token and the limit.
      index = jnp.arange(k + 1)
      new = jnp.where(index < m, jnp.concatenate([d_k, d_k[:1]]), next_token)
      count = jnp.minimum(m + 1, limit - s.n)
      if end_token is not None:
        hit = (new == end_token) & (index < count)
        count = jnp.where(hit.any(), jnp.argmax(hit) + 1, count)
      new = jnp.where(index < count, new, PAD)
      tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, new, s.n, 0)
      n = s.n + count
      done = (n >= limit) | (hit.any() if end_token is not None else False)
      return s.replace(tokens=tokens, n=n, cache=cache,
                       draft_cache=d_cache if not shared else None, done=done,
                       proposed=s.proposed + k, accepted=s.accepted + m,
                       iterations=s.iterations + 1)

    final = jax.lax.while_loop(lambda s: ~s.done, body, state)
    return final.tokens[:N], jnp.stack([final.iterations, final.proposed, final.accepted])

  if B == 1:  # one row: no vmap (its batched positions would turn cache writes into scatters)
    return jax.tree.map(lambda x: x[None], row(prompt_BxP[0], lengths_B[0], row_keys_B[0]))
  return jax.vmap(row)(prompt_BxP, lengths_B, row_keys_B)
