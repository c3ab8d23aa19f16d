"""Compiled generation: a prefill of the prompt, then one `lax.while_loop` with a KV cache.

    python -m rag_jax.sample --workdir=DIR --prompt="ROMEO:" --num_tokens=200 [--seed=0]
        [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--greedy] [--batch=1]

Context: positions are learned up to `block_size` (T). When prompt + generated text outgrow it,
the cache is rebuilt from the last T//2 tokens (one prefill, inside the loop) and generation goes
on, so every token sees between T//2 and T tokens of context; nanoGPT instead re-runs the last T
tokens for every token. The key of the token at position t is `fold_in(key, t)`.
"""
from __future__ import annotations

import functools
import sys
import time

from absl import app, flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import activation
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt


def sample_token(logits_BxV: jax.Array, key: jax.Array, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> jax.Array:
  """One token per row: greedy, or from softmax(logits / temperature) restricted by top-k and
  top-p (the smallest set of most likely tokens whose probability reaches p)."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    # Keep a token while the mass of the more likely ones is still below p.
    keep = mass_before_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array       # B x N: prompt then generated tokens
  cache: gpt.Cache
  t: jax.Array            # index in `tokens` of the next token to generate
  pos: jax.Array          # position in the cache of the last token fed in (tokens[t-1])
  logits: jax.Array       # B x V: prediction for tokens[t]
  fraction: jax.Array     # active fraction of the forward pass that gave `logits`
  fractions: jax.Array    # num_tokens: the active fraction behind each generated token
  done: jax.Array         # B: an end token was generated


POLICIES = ('dense', 'fixed', 'random')


def _mean_fraction(plan) -> jax.Array:
  if plan is None:
    return jnp.float32(1.0)
  fractions = list(activation.active_fractions(plan).values())
  return jnp.mean(jnp.stack(fractions)).astype(jnp.float32) if fractions else jnp.float32(1.0)


@functools.partial(jax.jit, static_argnames=(
    'model', 'num_tokens', 'temperature', 'top_k', 'top_p', 'greedy', 'end_token', 'policy',
    'active_fraction', 'act'))
def generate(params, model: gpt.GPT, prompt_BxP: jax.Array, key: jax.Array, *, num_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             end_token: int | None = None, policy: str = 'dense',
             active_fraction: float | None = None,
             act: ml_collections.FrozenConfigDict | None = None) -> tuple[jax.Array, jax.Array]:
  """Prompt plus `num_tokens` generated tokens, B x (P + num_tokens), and the active fraction
  behind each generated token.

  Activation `policy`: `dense`; `fixed` (`active_fraction` with `act`'s sites and structure);
  `random` (a fresh draw a = 1 - lam*B at every time step, B ~ Beta(alpha, beta) from `act`).
  The forward pass of the token at position t uses the activation key fold_in(act_key, t); the
  token at index t is sampled with fold_in(token_key, t). The batch shares each step's draw.
  """
  cfg = model.cfg
  B, P = prompt_BxP.shape
  T, window = cfg.block_size, max(cfg.block_size // 2, 1)
  token_key, act_key = jax.random.split(key)

  def plan_at(t):
    if policy == 'dense':
      return None
    return activation.make_plan(jax.random.fold_in(act_key, t), act, cfg,
                                fraction=active_fraction if policy == 'fixed' else None)

  def apply(tokens, cache, pos, plan):
    return model.apply({'params': params}, tokens, cache=cache, pos=pos, plan=plan)

  tokens_BxN = jnp.zeros((B, P + num_tokens), jnp.int32).at[:, :P].set(prompt_BxP)
  plan = plan_at(P - 1)
  logits_BxPxV, cache = apply(prompt_BxP, gpt.init_cache(cfg, B), 0, plan)
  state = DecodeState(tokens=tokens_BxN, cache=cache, t=jnp.array(P), pos=jnp.array(P - 1),
                      logits=logits_BxPxV[:, -1], fraction=_mean_fraction(plan),
                      fractions=jnp.zeros(num_tokens, jnp.float32), done=jnp.zeros(B, bool))

  def refill(s: DecodeState):
    """Cache full: rebuild it from the last `window` tokens (ending with the one just sampled,
    tokens[t], which the caller feeds at position window-1)."""
    recent_BxW = jax.lax.dynamic_slice_in_dim(s.tokens, s.t - window + 1, window, axis=1)
    _, cache = apply(recent_BxW[:, :-1], gpt.init_cache(cfg, B), 0, plan_at(s.t - 1))
    return cache, jnp.array(window - 1)

  def body(s: DecodeState) -> DecodeState:
    token_B = sample_token(s.logits, jax.random.fold_in(token_key, s.t), temperature, top_k,
                           top_p, greedy)
    token_B = jnp.where(s.done, 0 if end_token is None else end_token, token_B)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token_B[:, None], s.t, axis=1)
    fractions = s.fractions.at[s.t - P].set(s.fraction)
    done = s.done if end_token is None else s.done | (token_B == end_token)
    cache, pos = jax.lax.cond(s.pos + 1 >= T, refill, lambda s: (s.cache, s.pos + 1),
                              s.replace(tokens=tokens))
    plan = plan_at(s.t)
    logits_Bx1xV, cache = apply(token_B[:, None], cache, pos, plan)
    return DecodeState(tokens=tokens, cache=cache, t=s.t + 1, pos=pos, logits=logits_Bx1xV[:, 0],
                       fraction=_mean_fraction(plan), fractions=fractions, done=done)

  def cond(s: DecodeState):
    return (s.t < P + num_tokens) & ~jnp.all(s.done)

  final = jax.lax.while_loop(cond, body, state)
  return final.tokens, final.fractions


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


def sample(params, model: gpt.GPT, tokenizer, prompts: list[str], num_tokens: int,
           key: jax.Array, *, act: ml_collections.ConfigDict | None = None, **knobs) -> dict:
  """Notebook API: `tokens`, `text` and per-step active `fractions` of each prompt's
  continuation (prompts of equal length). `knobs`: temperature, top_k, top_p, greedy,
  end_token, policy, active_fraction (see `generate`)."""
  encoded = [encode_prompt(tokenizer, p, model.cfg) for p in prompts]
  if len({len(e) for e in encoded}) != 1:
    raise ValueError('prompts of different lengths are not supported yet; pad them yourself.')
  frozen = None if act is None else ml_collections.FrozenConfigDict(act)
  tokens, fractions = generate(params, model, jnp.asarray(np.stack(encoded)), key,
                               num_tokens=num_tokens, act=frozen, **knobs)
  tokens = np.asarray(tokens)
  return {'tokens': tokens, 'text': [tokenizer.decode(row) for row in tokens],
          'fractions': np.asarray(fractions)}


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.', required=True)
  flags.DEFINE_string('prompt', '\n', 'Text to continue.')
  flags.DEFINE_integer('num_tokens', 200, 'Tokens to generate.', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Sampling seed (folded into the run\'s sample key).')
  flags.DEFINE_integer('batch', 1, 'Samples of the same prompt.', lower_bound=1)
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature.', lower_bound=1e-6)
  flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).', lower_bound=0)
  flags.DEFINE_float('top_p', 1.0, 'Nucleus: smallest set with this much mass.', lower_bound=0,
                     upper_bound=1)
  flags.DEFINE_bool('greedy', False, 'Take the most likely token.')
  flags.DEFINE_float('active_fraction', None, 'Generate at this fixed active fraction.')
  flags.DEFINE_enum('policy', None, list(POLICIES),
                    'dense (default), fixed (with --active_fraction) or random (a fresh draw '
                    'at every time step from the run\'s alpha, beta, lam or the flags below).')
  flags.DEFINE_float('alpha', None, 'Override the run\'s activation alpha.')
  flags.DEFINE_float('beta', None, 'Override the run\'s activation beta.')
  flags.DEFINE_float('lam', None, 'Override the run\'s activation lam.')


def main(argv):
  workdir_lib.quiet_logs()
  del argv
  from rag_jax import evaluate  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    config, tokenizer, model, params, _ = evaluate.load_run(f.workdir)
    prompt_BxP = jnp.asarray(np.stack([encode_prompt(tokenizer, f.prompt, model.cfg)] * f.batch))
    policy = f.policy or ('fixed' if f.active_fraction is not None else 'dense')
    if policy == 'fixed' and not (f.active_fraction is not None and 0 < f.active_fraction <= 1):
      raise ValueError('--policy=fixed needs --active_fraction in (0, 1].')
    if policy != 'fixed' and f.active_fraction is not None:
      raise ValueError(f'--active_fraction goes with --policy=fixed, not {policy}.')
    act = config.activation
    act.update({k: f[k].value for k in ('alpha', 'beta', 'lam') if f[k].value is not None})
    if policy != 'dense':
      activation.validate(act, config.model)
  except ValueError as e:
    sys.exit(f'error: {e}')
  key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], f.seed)
  knobs = dict(num_tokens=f.num_tokens, temperature=f.temperature,
               top_k=min(f.top_k, tokenizer.vocab_size), top_p=f.top_p, greedy=f.greedy,
               policy=policy, active_fraction=f.active_fraction,
               act=ml_collections.FrozenConfigDict(act))
  compiled = generate.lower(params, model, prompt_BxP, key, **knobs).compile()
  start = time.perf_counter()
  tokens, fractions = jax.device_get(compiled(params, prompt_BxP, key))
  seconds = time.perf_counter() - start
  out = {'text': [tokenizer.decode(row) for row in tokens]}
  for text in out['text']:
    print(text)
    print('-' * 40)
  print(f'{f.batch * f.num_tokens / seconds:.1f} tokens/s ({f.batch} x {f.num_tokens} tokens '
        f'in {seconds:.2f} s); policy {policy}, mean active fraction {np.mean(fractions):.3f}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
