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
import numpy as np

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
  done: jax.Array         # B: an end token was generated


@functools.partial(jax.jit, static_argnames=(
    'model', 'num_tokens', 'temperature', 'top_k', 'top_p', 'greedy', 'end_token'))
def generate(params, model: gpt.GPT, prompt_BxP: jax.Array, key: jax.Array, *, num_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             end_token: int | None = None) -> jax.Array:
  """Prompt plus `num_tokens` generated tokens, B x (P + num_tokens)."""
  cfg = model.cfg
  B, P = prompt_BxP.shape
  T, window = cfg.block_size, max(cfg.block_size // 2, 1)
  apply = lambda tokens, cache, pos: model.apply({'params': params}, tokens, cache=cache, pos=pos)
  tokens_BxN = jnp.zeros((B, P + num_tokens), jnp.int32).at[:, :P].set(prompt_BxP)
  logits_BxPxV, cache = apply(prompt_BxP, gpt.init_cache(cfg, B), 0)
  state = DecodeState(tokens=tokens_BxN, cache=cache, t=jnp.array(P), pos=jnp.array(P - 1),
                      logits=logits_BxPxV[:, -1], done=jnp.zeros(B, bool))

  def refill(s: DecodeState):
    """Cache full: rebuild it from the last `window` tokens (ending with the one just sampled,
    tokens[t], which the caller feeds at position window-1)."""
    recent_BxW = jax.lax.dynamic_slice_in_dim(s.tokens, s.t - window + 1, window, axis=1)
    _, cache = apply(recent_BxW[:, :-1], gpt.init_cache(cfg, B), 0)
    return cache, jnp.array(window - 1)

  def body(s: DecodeState) -> DecodeState:
    token_B = sample_token(s.logits, jax.random.fold_in(key, s.t), temperature, top_k, top_p,
                           greedy)
    token_B = jnp.where(s.done, 0 if end_token is None else end_token, token_B)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token_B[:, None], s.t, axis=1)
    done = s.done if end_token is None else s.done | (token_B == end_token)
    cache, pos = jax.lax.cond(s.pos + 1 >= T, refill, lambda s: (s.cache, s.pos + 1),
                              s.replace(tokens=tokens))
    logits_Bx1xV, cache = apply(token_B[:, None], cache, pos)
    return DecodeState(tokens=tokens, cache=cache, t=s.t + 1, pos=pos,
                       logits=logits_Bx1xV[:, 0], done=done)

  def cond(s: DecodeState):
    return (s.t < P + num_tokens) & ~jnp.all(s.done)

  return jax.lax.while_loop(cond, body, state).tokens


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
           key: jax.Array, **knobs) -> dict:
  """Notebook API: tokens and text of each prompt's continuation (prompts of equal length)."""
  encoded = [encode_prompt(tokenizer, p, model.cfg) for p in prompts]
  if len({len(e) for e in encoded}) != 1:
    raise ValueError('prompts of different lengths are not supported yet; pad them yourself.')
  tokens = np.asarray(generate(params, model, jnp.asarray(np.stack(encoded)), key,
                               num_tokens=num_tokens, **knobs))
  return {'tokens': tokens, 'text': [tokenizer.decode(row) for row in tokens]}


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


def main(argv):
  workdir_lib.quiet_logs()
  del argv
  from rag_jax import evaluate  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    config, tokenizer, model, params, _ = evaluate.load_run(f.workdir)
    prompt_BxP = jnp.asarray(np.stack([encode_prompt(tokenizer, f.prompt, model.cfg)] * f.batch))
  except ValueError as e:
    sys.exit(f'error: {e}')
  key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], f.seed)
  knobs = dict(num_tokens=f.num_tokens, temperature=f.temperature,
               top_k=min(f.top_k, tokenizer.vocab_size), top_p=f.top_p, greedy=f.greedy)
  compiled = generate.lower(params, model, prompt_BxP, key, **knobs).compile()
  start = time.perf_counter()
  tokens = np.asarray(compiled(params, prompt_BxP, key))
  seconds = time.perf_counter() - start
  out = {'text': [tokenizer.decode(row) for row in tokens]}
  for text in out['text']:
    print(text)
    print('-' * 40)
  print(f'{f.batch * f.num_tokens / seconds:.1f} tokens/s ({f.batch} x {f.num_tokens} tokens '
        f'in {seconds:.2f} s); active fraction 1.00 (dense)')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
