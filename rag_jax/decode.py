"""Offline generation: a prefill of the prompts, then one `lax.while_loop` with a KV cache, the
policy's decoder (rag_jax/policies.py) feeding each token. `rag_jax.sample` is its user API and
command line; rag_jax/engine.py decodes requests in slots for a server.

The rules (docs/sampling.md explains them):

* Prompts of different lengths all start at position 0 and share positions. The prefill covers
  the padded prompt array; the loop starts at the shortest prompt's end and, while a row's prompt
  is not finished, feeds that row its own next prompt token instead of a sampled one. Each row
  gets `num_tokens` tokens after its own prompt and stops early at an end token.
* Keys: `key` splits into (token_key, act_key). The token at index t of row b is drawn with
  fold_in(fold_in(token_key, id_b), t); `sample` takes id_b from the row's prompt and sample
  number, so a row's text does not depend on the rest of the batch.
* Activation (`policy`): `dense`; `fixed` (one plan, make_plan(act_key, fraction=a), for the
  whole generation: a fixed sub-model); `random` (the token at index t, prompt or generated, is
  fed through make_plan(fold_in(act_key, t)): a fresh draw a = 1 - lam*B per time step, shared
  by the batch; prefills use the same per-position draws as masks); `adaptive` (every token runs
  at the nested width a, and again at the full width when a's top-1 probability is below the
  threshold, in which case its keys and values are the full width's; a prefill is a narrow pass
  then one pass with each position at its chosen width, as `evaluate --policy=adaptive` scores,
  and a prompt token fed in the loop keeps the width the prefill chose for it).
* Context: positions are learned up to `block_size` T. When a token would land at position T,
  the cache is rebuilt from the last T//2 tokens (one prefill, inside the loop), so every token
  sees between T//2 and T tokens; nanoGPT instead re-runs the last T tokens for every token.
"""
from __future__ import annotations

import functools
import zlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import policies
from rag_jax import sampling
from rag_jax import speculative
from rag_jax.models import gpt

PAD = policies.PAD
MAX_PLAN_BYTES = 1 << 30  # policy random: the per-index plans of random/bernoulli units
PROMPT_PAD = 16  # prompt arrays are padded to a multiple of this: fewer shapes to compile
# The policies `generate` runs: all but speculative, which has its own loop (speculative.py).
GENERATE_POLICIES = tuple(p for p in policies.NAMES if p != policies.Speculative.name)


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array       # B x N: prompts, generated tokens, then PAD
  cache: gpt.Cache
  t: jax.Array            # index in `tokens` of the next token to choose
  pos: jax.Array          # cache position of the last token fed in (tokens[t-1])
  logits: jax.Array       # B x V: prediction for tokens[t]
  done: jax.Array         # B: the row needs no more tokens
  escalated: jax.Array | None = None  # policy adaptive, B x N: the pass fed tokens[i] escalated


# XLA:CPU's YNNPACK fusions run the decode step's small reductions (attention of one query over
# the cache) about 10x slower than XLA's own loops: off for the sampler on the CPU, where a
# dense batch-1 decode step of the :gpu model took 0.88x as long without them (README).
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def compiler_options() -> dict[str, str]:
  """CPU_COMPILER_OPTIONS on the CPU when this XLA knows them; else none."""
  if jax.default_backend() != 'cpu':
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except  (an XLA without the option)
    return {}
  return dict(CPU_COMPILER_OPTIONS)


class _Jit:
  """`jax.jit(fn, ...)` built at its first call, once the backend (and so `compiler_options`)
  is known: importing this module starts no backend."""

  def __init__(self, fn, **kwargs):
    self._fn, self._kwargs, self._jit = fn, kwargs, None
    functools.update_wrapper(self, fn)

  def _get(self):
    if self._jit is None:
      self._jit = jax.jit(self._fn, compiler_options=compiler_options(), **self._kwargs)
    return self._jit

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._get().lower(*args, **kwargs)


def generate(params, model: gpt.GPT, prompt_BxP: jax.Array, key: jax.Array,
             prompt_lengths_B: jax.Array | None = None, sample_ids_B: jax.Array | None = None, *,
             num_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, end_token: int | None = None,
             policy: str | policies.Policy = 'dense', active_fraction: float | None = None,
             act: ml_collections.FrozenConfigDict | None = None,
             threshold: float | None = None) -> tuple[jax.Array, jax.Array]:
  """`num_tokens` tokens after each row's prompt (see the module docstring for the rules).

  Row b's prompt is prompt_BxP[b, :prompt_lengths_B[b]] (default: all P tokens); its sampling
  key folds in sample_ids_B[b] (default: b). Returns tokens B x (P + num_tokens) (prompt,
  continuation, then PAD after the row's last token: `num_tokens` or an end token) and the mean
  active fraction of the forward pass behind each generated token, B x num_tokens (`adaptive`:
  the narrow pass's fraction, plus 1 where the token escalated and paid for both passes).
  `policy`: a policies.Policy, or its name with `active_fraction` (fixed's width, adaptive's
  narrow width), `act` and `threshold` (adaptive).
  """
  if not isinstance(policy, policies.Policy):
    if policy not in GENERATE_POLICIES:
      raise ValueError(f'policy must be one of {GENERATE_POLICIES}, got {policy!r} (speculative: '
                       'speculative_generate).')
    if policy == 'adaptive' and threshold is None:
      raise ValueError('policy adaptive needs `threshold`.')
    policy = policies.make(policy, act, fraction=active_fraction,
                           threshold=0.5 if threshold is None else threshold)
  B, P = prompt_BxP.shape
  token_key, act_key = jax.random.split(key)
  decoder = policy.decoder(params, model, act_key, P + num_tokens)
  lengths_B = (jnp.full((B,), P, jnp.int32) if prompt_lengths_B is None
               else jnp.asarray(prompt_lengths_B, jnp.int32))
  ids_B = jnp.arange(B) if sample_ids_B is None else sample_ids_B
  row_keys_B = jax.vmap(lambda i: jax.random.fold_in(token_key, i))(ids_B)
  draw = functools.partial(_draw, row_keys_B=row_keys_B, greedy=greedy,
                           temperature=temperature, top_k=top_k, top_p=top_p)
  final = _decode_loop(decoder, prompt_BxP, lengths_B, num_tokens, draw, end_token)
  # Generated token j of row b came from the pass that fed index lengths_B[b] + j - 1.
  fed_BxM = lengths_B[:, None] + jnp.arange(num_tokens) - 1
  fractions_BxM = decoder.cost_N[fed_BxM]
  if decoder.escalates:
    fractions_BxM += jnp.take_along_axis(final.escalated, fed_BxM, axis=1)
  return final.tokens, fractions_BxM


def _draw(logits_BxV, t, *, row_keys_B, greedy, temperature, top_k, top_p):
  """The token at index t of every row, from its own key (sampling.sample_token's rules)."""
  if greedy:
    return sampling.sample_token(logits_BxV, None, greedy=True)
  keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, t)
  return jax.vmap(lambda l_V, k: sampling.sample_token(l_V[None], k, temperature, top_k,
                                                      top_p)[0])(logits_BxV, keys_B)


def _decode_loop(decoder: policies.Decoder, prompt_BxP, lengths_B, num_tokens: int, draw,
                 end_token: int | None) -> DecodeState:
  """The prefill, then one `lax.while_loop` over indices, every row at the position of its
  index; when a token would land at position T the cache is rebuilt from the last T//2 tokens.
  Returns the final state (tokens: prompt, continuation, PAD)."""
  B, P = prompt_BxP.shape
  N = P + num_tokens
  T = decoder.model.cfg.block_size
  keep = gpt.rebuild_keep(T)
  last_B = lengths_B + num_tokens - 1  # each row's last index

  def refill(tokens_BxN, t):
    """Cache full: rebuild it from the `keep` tokens before index t."""
    if keep == 0:
      return gpt.init_cache(decoder.model.cfg, B), jnp.int32(0)
    recent_BxK = jax.lax.dynamic_slice_in_dim(tokens_BxN, t - keep, keep, axis=1)
    return decoder.prefill(recent_BxK, t - keep)[1], jnp.int32(keep)

  def choose(s: DecodeState):
    """Writes the token at index s.t: the prompt's, a sampled one, or PAD when done."""
    forced_B = s.t < lengths_B
    prompt_B = jax.lax.dynamic_index_in_dim(prompt_BxP, jnp.minimum(s.t, P - 1), 1, False)
    token_B = jnp.where(forced_B, prompt_B, draw(s.logits, s.t))
    token_B = jnp.where(s.done, PAD, token_B)
    done_B = s.done | (s.t >= last_B)
    if end_token is not None:
      done_B |= ~forced_B & (token_B == end_token)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token_B[:, None], s.t, axis=1)
    return s.replace(tokens=tokens, done=done_B), token_B

  def body(s: DecodeState) -> DecodeState:
    s, token_B = choose(s)
    if N <= T:  # the cache never fills (and refill's window would not fit the buffer)
      cache, pos = s.cache, s.pos + 1
    else:
      cache, pos = jax.lax.cond(s.pos + 1 >= T, lambda: refill(s.tokens, s.t),
                                lambda: (s.cache, s.pos + 1))
    if not decoder.escalates:
      logits_BxV, cache, _ = decoder.step(token_B, cache, pos, s.t)
      return s.replace(cache=cache, t=s.t + 1, pos=pos, logits=logits_BxV)
    prefilled_B = jax.lax.dynamic_index_in_dim(s.escalated, s.t, 1, False)
    logits_BxV, cache, escalate_B = decoder.step(token_B, cache, pos, s.t, s.t < lengths_B,
                                                 prefilled_B)
    escalated = jax.lax.dynamic_update_slice_in_dim(s.escalated, escalate_B[:, None], s.t, 1)
    return s.replace(cache=cache, t=s.t + 1, pos=pos, logits=logits_BxV, escalated=escalated)

  t0 = jnp.min(lengths_B)  # the first index some row generates
  logits_BxPxV, cache, escalate_BxP = decoder.prefill(prompt_BxP, 0)
  in_prompt_BxP = jnp.arange(P)[None, :] < lengths_B[:, None]
  tokens_BxN = jnp.full((B, N), PAD, jnp.int32).at[:, :P].set(
      jnp.where(in_prompt_BxP, prompt_BxP, PAD))
  escalated_BxN = None if escalate_BxP is None else (
      jnp.zeros((B, N), bool).at[:, :P].set(escalate_BxP))
  state = DecodeState(tokens=tokens_BxN, cache=cache, t=t0, pos=t0 - 1,
                      logits=jax.lax.dynamic_index_in_dim(logits_BxPxV, t0 - 1, 1, False),
                      done=jnp.zeros(B, bool), escalated=escalated_BxN)
  stop = jnp.max(last_B)
  state = jax.lax.while_loop(lambda s: (s.t < stop) & ~jnp.all(s.done), body, state)
  return choose(state)[0]  # the last token needs no forward pass


generate = _Jit(generate, static_argnames=(
    'model', 'num_tokens', 'temperature', 'top_k', 'top_p', 'greedy', 'end_token', 'policy',
    'active_fraction', 'act', 'threshold'))
speculative_generate = _Jit(speculative.generate, static_argnames=(
    'model', 'num_tokens', 'temperature', 'top_k', 'top_p', 'greedy', 'end_token', 'act',
    'draft_fraction', 'draft_tokens', 'draft_cache'))


def encode_prompt(tokenizer, prompt: str, cfg: gpt.GPTConfig) -> np.ndarray:
  """Tokens of a prompt, or one clear ValueError (unknown characters, empty, too long)."""
  unknown = tokenizer.unknown(prompt)
  if unknown:
    raise ValueError(f'the prompt has character(s) the tokenizer does not know: '
                     f'{"".join(unknown)!r}; it knows only those of the training split.')
  tokens = tokenizer.encode(prompt)
  if len(tokens) == 0:
    raise ValueError('the prompt is empty; give at least one character.')
  if len(tokens) > cfg.block_size:
    raise ValueError(f'the prompt has {len(tokens)} tokens but the model\'s context is '
                     f'{cfg.block_size}; shorten it.')
  return tokens


def sample_id(prompt_tokens: np.ndarray, j: int) -> int:
  """The sampling id of sample j of a prompt: a function of the prompt's tokens and j only."""
  data = np.asarray(prompt_tokens, np.int32).tobytes() + np.int32(j).tobytes()
  return zlib.crc32(data) & 0x7FFFFFFF


def prompt_rows(tokenizer, prompts, batch: int, cfg) -> tuple[np.ndarray, ...]:
  """(prompts R x P padded with PAD, their lengths R, sampling ids R): row r is sample
  r % batch of prompt r // batch; P a multiple of PROMPT_PAD (fewer shapes to compile)."""
  encoded = []
  for i, prompt in enumerate(prompts):
    try:
      encoded.append(encode_prompt(tokenizer, prompt, cfg))
    except ValueError as e:
      raise ValueError(f'prompt {i + 1}: {e}' if len(prompts) > 1 else str(e)) from None
  rows = [(e, j) for e in encoded for j in range(batch)]
  P = min(-(-max(len(e) for e in encoded) // PROMPT_PAD) * PROMPT_PAD, cfg.block_size)
  prompt_RxP = np.full((len(rows), P), PAD, np.int32)
  for r, (e, _) in enumerate(rows):
    prompt_RxP[r, :len(e)] = e
  return (prompt_RxP, np.asarray([len(e) for e, _ in rows], np.int32),
          np.asarray([sample_id(e, j) for e, j in rows], np.int32))


def check_plans(policy: policies.Policy, model: ml_collections.ConfigDict, num_indices: int):
  """`random` draws a plan per index up front; with random/bernoulli units those are big: one
  ValueError when they would pass MAX_PLAN_BYTES."""
  table_bytes = 4 * num_indices * model.num_layers * (model.mlp_dim + model.num_heads)
  if (isinstance(policy, policies.Random) and policy.act.structure != 'nested'
      and table_bytes > MAX_PLAN_BYTES):
    raise ValueError(f'policy random with structure {policy.act.structure} keeps every step\'s '
                     f'units: {table_bytes / 2**30:.1f} GiB for {num_indices} indices; generate '
                     'fewer tokens.')
