"""Compiled generation: a prefill of the prompts, then one `lax.while_loop` with a KV cache.

    python -m rag_jax.sample --workdir=DIR --prompt="ROMEO:" [--prompt="JULIET:"] --num_tokens=200
        [--active_fraction=0.5 | --policy=random | --policy=adaptive --threshold=0.5
         | --policy=speculative] [--draft_fraction=0.5] [--seed=0] [--batch=1] [--temperature=0.8]
        [--top_k=0] [--top_p=1.0] [--greedy] [--end=CHAR] [--alpha= --beta= --lam=]

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

import dataclasses
import functools
import sys
import time
from typing import Sequence
import zlib

from absl import app, flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import activation
from rag_jax import cli
from rag_jax import flops
from rag_jax import policies
from rag_jax import runs
from rag_jax import sampling
from rag_jax import speculative
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt

# The policies (rag_jax/policies.py); `generate` runs all but speculative, which has its own loop.
POLICIES = policies.NAMES
GENERATE_POLICIES = tuple(p for p in POLICIES if p != policies.Speculative.name)
# The token choice (greedy, temperature, top-k, top-p): rag_jax/sampling.py.
sample_token = sampling.sample_token
PAD = policies.PAD
MAX_TOKENS = 1 << 20  # num_tokens cap: the token buffer is batch x (prompt + num_tokens)
MAX_PLAN_BYTES = 1 << 30  # policy random: the per-index plans of random/bernoulli units
PROMPT_PAD = 16  # `sample` pads the prompt array to a multiple of this


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
  window = max(T // 2, 1)
  last_B = lengths_B + num_tokens - 1  # each row's last index

  def refill(tokens_BxN, t):
    """Cache full: rebuild it from the `window - 1` tokens before index t."""
    if window == 1:
      return gpt.init_cache(decoder.model.cfg, B), jnp.int32(0)
    recent_BxW = jax.lax.dynamic_slice_in_dim(tokens_BxN, t - window + 1, window - 1, axis=1)
    return decoder.prefill(recent_BxW, t - window + 1)[1], jnp.int32(window - 1)

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


@dataclasses.dataclass(frozen=True)
class Samples:
  """What `sample` returns. Row r is sample r % batch of prompt r // batch."""
  tokens: np.ndarray          # R x (P + num_tokens), P the padded prompt width: prompt,
                              # continuation, then PAD
  lengths: np.ndarray         # R: tokens of each row (through its end token if one came)
  prompt_lengths: np.ndarray  # R
  text: list[str]             # R: each row's tokens[:length], decoded
  fractions: np.ndarray       # R x num_tokens: active fraction behind each token (NaN after end)
  policy: str                 # its name (policies.NAMES)
  describe: str               # the policy and its settings, e.g. 'fixed 0.5'
  relative_flops: float | None  # FLOPs per generated token / the dense model's (None:
                                # speculative, whose cost is `speculation`)
  escalated: float | None     # adaptive: the share of generated tokens that escalated
  seconds: float              # generation wall time, compilation excluded
  compile_seconds: float
  # policy speculative: per row [iterations, draft tokens proposed, accepted]
  speculation: np.ndarray | None = None

  @property
  def num_generated(self) -> int:
    return int(np.sum(self.lengths - self.prompt_lengths))

  @property
  def tokens_per_sec(self) -> float:
    return self.num_generated / self.seconds

  @property
  def mean_fraction(self) -> float:
    return float(np.nanmean(self.fractions))


def _is_int(x, low: int, high: int) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and low <= x <= high


def _knobs(config, tokenizer, num_tokens, seed, batch, temperature, top_k, top_p, greedy,
           end) -> dict:
  """Checks the sampling settings (ValueError naming the problem); the static knobs of
  `generate` but the policy."""
  if not _is_int(num_tokens, 1, MAX_TOKENS):
    raise ValueError(f'num_tokens must be an integer in [1, {MAX_TOKENS}], got {num_tokens!r}.')
  if not _is_int(seed, 0, 2**32 - 1):
    raise ValueError(f'seed must be an integer in [0, 2**32), got {seed!r}.')
  if not _is_int(batch, 1, MAX_TOKENS):
    raise ValueError(f'batch must be a positive integer, got {batch!r}.')
  if not greedy and not temperature > 0:
    raise ValueError(f'temperature must be > 0 (or use greedy), got {temperature!r}.')
  if not _is_int(top_k, 0, 2**31 - 1):
    raise ValueError(f'top_k must be an integer >= 0 (0: all tokens), got {top_k!r}.')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p!r}.')
  if end is not None and (tokenizer.unknown(end) or len(tokenizer.encode(end)) != 1):
    raise ValueError(f'the end text {end!r} must be one token the tokenizer knows.')
  return dict(num_tokens=num_tokens, temperature=float(temperature),
              top_k=min(top_k, tokenizer.vocab_size), top_p=float(top_p), greedy=bool(greedy),
              end_token=None if end is None else int(tokenizer.encode(end)[0]))


def _policy(config, num_tokens, policy, active_fraction, act, draft_fraction, draft_tokens,
            draft_cache, threshold) -> policies.Policy:
  """The policy object of `sample`'s arguments (one ValueError naming the problem)."""
  name = policy or ('fixed' if active_fraction is not None else 'dense')
  if name in ('dense', 'adaptive', 'speculative') and active_fraction is not None:
    raise ValueError(f'--active_fraction (active_fraction=) goes with policy fixed, not {name}.')
  fraction = draft_fraction if name in ('adaptive', 'speculative') else active_fraction
  act = config.activation if act is None else act
  out = policies.make(name, act, config.model, fraction=fraction, threshold=threshold,
                      draft_tokens=draft_tokens, draft_cache=draft_cache)
  m = config.model  # `random` draws a plan per index up front; random/bernoulli units are big.
  table_bytes = 4 * (m.block_size + num_tokens) * m.num_layers * (m.mlp_dim + m.num_heads)
  if name == 'random' and act.structure != 'nested' and table_bytes > MAX_PLAN_BYTES:
    raise ValueError(f'policy random with structure {act.structure} keeps every step\'s units: '
                     f'{table_bytes / 2**30:.1f} GiB for {num_tokens} tokens; generate fewer.')
  return out


def sample(params, config: ml_collections.ConfigDict, prompts: str | Sequence[str], *,
           tokenizer, num_tokens: int = 200, seed: int = 0, batch: int = 1,
           policy: str | None = None, active_fraction: float | None = None,
           temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           end: str | None = None, act: ml_collections.ConfigDict | None = None,
           draft_fraction: float = 0.5, draft_tokens: int = 4,
           draft_cache: str = 'shared', threshold: float = 0.5) -> Samples:
  """Generates `batch` continuations of each prompt, compiled (the CLI calls this too).

  `config` is the run's config (model, activation, seed) and `tokenizer` its tokenizer
  (`runs.load_run` gives both); the model runs in the run's `config.dtype`. `policy`: dense,
  fixed (at `active_fraction`; the default when one is given), random (a fresh draw per time
  step), speculative (the full model's output, drafted `draft_tokens` at a time by the
  nested width `draft_fraction`, its keys and values `draft_cache`: rag_jax/speculative.py;
  `Samples.speculation` counts what was accepted) or adaptive (every token at the nested width
  `draft_fraction`, rerun at the full width where that width's top-1 probability is below
  `threshold`: 0 never, above 1 always; `Samples.fractions` then counts both passes of an
  escalated token); `act` overrides
  `config.activation` (alpha, beta, lam, sites, structure, buckets). `end`: a one-token text
  (e.g. '\\n') that ends a row. The key is fold_in(root_keys(config.seed)['sample'], seed).
  Bad input raises one ValueError naming the problem, before anything compiles.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError('give at least one prompt.')
  knobs = _knobs(config, tokenizer, num_tokens, seed, batch, temperature, top_k, top_p, greedy,
                 end)
  chosen = _policy(config, num_tokens, policy, active_fraction, act, draft_fraction,
                   draft_tokens, draft_cache, threshold)
  model = runs.make_model(config, tokenizer.vocab_size)
  prompt_RxP, lengths_R, ids_R = _prompt_rows(tokenizer, prompts, batch, model.cfg)
  key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], seed)
  if isinstance(chosen, policies.Speculative):
    speculative.check(model.cfg, chosen.act, int(lengths_R.max()), num_tokens, chosen.fraction,
                      chosen.draft_tokens, chosen.draft_cache)
    program = speculative_generate
    knobs.update(act=chosen.act, draft_fraction=chosen.fraction,
                 draft_tokens=chosen.draft_tokens, draft_cache=chosen.draft_cache)
  else:
    program = generate
    knobs.update(policy=chosen)
  start = time.perf_counter()
  compiled = program.lower(params, model, prompt_RxP, key, lengths_R, ids_R, **knobs).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.device_get(compiled(params, prompt_RxP, key, lengths_R, ids_R))
  seconds = time.perf_counter() - start

  speculation = None
  if program is speculative_generate:  # every token is the full model's
    tokens_RxN, speculation = np.array(out[0]), np.array(out[1])
    fractions_RxM = np.ones((len(lengths_R), num_tokens), np.float32)
  else:
    tokens_RxN, fractions_RxM = np.array(out[0]), np.array(out[1])
  out_lengths_R = lengths_R + num_tokens
  if knobs['end_token'] is not None:
    for r, length in enumerate(lengths_R):
      hits = np.flatnonzero(tokens_RxN[r, length:length + num_tokens] == knobs['end_token'])
      if hits.size:
        out_lengths_R[r] = length + hits[0] + 1
  fractions_RxM[np.arange(num_tokens)[None] >= (out_lengths_R - lengths_R)[:, None]] = np.nan
  escalated = (float(np.nanmean(fractions_RxM)) - chosen.fraction
               if isinstance(chosen, policies.Adaptive) else None)
  return Samples(tokens=tokens_RxN, lengths=out_lengths_R, prompt_lengths=lengths_R,
                 text=[tokenizer.decode(row[:n]) for row, n in zip(tokens_RxN, out_lengths_R)],
                 fractions=fractions_RxM, policy=chosen.name, describe=chosen.describe(),
                 relative_flops=_relative_flops(chosen, model.cfg, escalated),
                 escalated=escalated,
                 seconds=seconds, compile_seconds=compile_seconds, speculation=speculation)


def _prompt_rows(tokenizer, prompts, batch: int, cfg) -> tuple[np.ndarray, ...]:
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


def _relative_flops(policy: policies.Policy, cfg, escalated: float | None) -> float | None:
  """FLOPs per generated token against the dense model's (flops.flops_per_token): a fixed
  width's, the expectation of random draws, adaptive's narrow pass plus its escalated share of
  full passes. None for speculative (its cost is in passes: `Samples.speculation`)."""
  dense = flops.flops_per_token(cfg)
  if isinstance(policy, policies.Speculative):
    return None
  if policy.act is None:
    return 1.0
  if isinstance(policy, policies.Adaptive):
    narrow = flops.flops_per_token(cfg, **activation.compute_fractions(policy.act, cfg,
                                                                       policy.fraction))
    return (narrow + escalated * dense) / dense
  fraction = policy.fraction if isinstance(policy, policies.Fixed) else None
  return flops.flops_per_token(cfg, **activation.compute_fractions(policy.act, cfg,
                                                                   fraction)) / dense


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.', required=True)
  flags.DEFINE_multi_string('prompt', ['\n'], 'Text to continue; repeat for several prompts.')
  flags.DEFINE_integer('num_tokens', 200, 'Tokens to generate after each prompt.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed (folded into the run\'s sample key).')
  flags.DEFINE_integer('batch', 1, 'Samples of each prompt.')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature.')
  flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus: the smallest set of tokens with this much mass.')
  flags.DEFINE_bool('greedy', False, 'Take the most likely token.')
  flags.DEFINE_string('end', None, 'A one-token text (e.g. a newline) that ends a sample.')
  flags.DEFINE_float('active_fraction', None, 'Generate at this fixed active fraction.')
  flags.DEFINE_enum('policy', None, list(POLICIES),
                    'dense (default), fixed (with --active_fraction), random (a fresh draw '
                    'at every time step from the run\'s alpha, beta, lam or the flags below) or '
                    'speculative (the full model\'s text, drafted by a narrow width) or adaptive '
                    '(a narrow width, escalated to the full one when unsure).')
  flags.DEFINE_float('draft_fraction', 0.5,
                     'speculative: the nested width that drafts; adaptive: the width every token '
                     'runs at first.')
  flags.DEFINE_float('threshold', 0.5, 'adaptive: escalate a token to the full width when the '
                     "narrow width's top-1 probability is below this.")
  flags.DEFINE_integer('draft_tokens', 4, 'speculative: tokens drafted per full-width pass.')
  flags.DEFINE_enum('draft_cache', 'shared', list(speculative.DRAFT_CACHES),
                    "speculative: the draft reads the full model's keys and values (shared) or "
                    'keeps its own (separate).')
  cli.define_activation_flags()


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  f = flags.FLAGS
  try:
    config, tokenizer, _, params, _ = runs.load_run(f.workdir)
    act = config.activation
    act.update(cli.activation_overrides())
    out = sample(params, config, f.prompt, tokenizer=tokenizer, num_tokens=f.num_tokens,
                 seed=f.seed, batch=f.batch, policy=f.policy, active_fraction=f.active_fraction,
                 temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, greedy=f.greedy,
                 end=f.end, act=act, draft_fraction=f.draft_fraction,
                 draft_tokens=f.draft_tokens, draft_cache=f.draft_cache, threshold=f.threshold)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  for text in out.text:
    print(text)
    print('-' * 40)
  print(f'{out.tokens_per_sec:.1f} tokens/s ({out.num_generated} tokens in {out.seconds:.2f} s, '
        f'compile {out.compile_seconds:.1f} s not counted); {cost(out)}')


def cost(out: Samples) -> str:
  """What the generated tokens cost, in words: widths, FLOPs against the dense model, and what
  speculation accepted or adaptive escalated."""
  if out.speculation is not None:
    proposed, accepted = out.speculation[:, 1].sum(), out.speculation[:, 2].sum()
    return (f'policy {out.describe}: the full model\'s text; {accepted / max(proposed, 1):.2f} of '
            f'the draft tokens accepted, {out.num_generated / out.speculation[:, 0].sum():.2f} '
            'tokens per full-width pass')
  flops_text = f'{out.relative_flops:.2f} of the dense model\'s FLOPs per token'
  if out.policy == 'adaptive':
    return f'policy {out.describe}: {flops_text}, {out.escalated:.0%} of the tokens escalated'
  return f'policy {out.policy}, mean active fraction {out.mean_fraction:.3f}, {flops_text}'


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
