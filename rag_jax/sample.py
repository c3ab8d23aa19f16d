"""Generating text from a trained run: the user API (`sample`) and the command line.

    python -m rag_jax.sample --workdir=DIR --prompt="ROMEO:" [--prompt="JULIET:"] --num_tokens=200
        [--active_fraction=0.5 | --policy=random | --policy=adaptive --threshold=0.5
         | --policy=speculative] [--draft_fraction=0.5] [--seed=0] [--batch=1] [--temperature=0.8]
        [--top_k=0] [--top_p=1.0] [--greedy] [--end=CHAR] [--alpha= --beta= --lam=]

The compiled loop and its rules (positions, keys, each policy's passes, the context rebuild) are
rag_jax/decode.py's; docs/sampling.md explains them.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

from absl import app, flags
import jax
import ml_collections
import numpy as np

from rag_jax import cli
from rag_jax import decode
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import runs
from rag_jax import sampling
from rag_jax import speculative
from rag_jax import workdir as workdir_lib

POLICIES = policies.NAMES  # rag_jax/policies.py
# The token choice (greedy, temperature, top-k, top-p): rag_jax/sampling.py.
sample_token = sampling.sample_token
PAD = policies.PAD
MAX_TOKENS = 1 << 20  # num_tokens cap: the token buffer is batch x (prompt + num_tokens)


generate = decode.generate
speculative_generate = decode.speculative_generate
compiler_options = decode.compiler_options


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

  def summary(self) -> str:
    """What the generated tokens cost: widths, FLOPs against the dense model's, and what
    speculation accepted or adaptive escalated."""
    if self.speculation is not None:
      proposed, accepted = self.speculation[:, 1].sum(), self.speculation[:, 2].sum()
      return (f'policy {self.describe}: the full model\'s text; '
              f'{accepted / max(proposed, 1):.2f} of the draft tokens accepted, '
              f'{self.num_generated / self.speculation[:, 0].sum():.2f} tokens per full-width pass')
    flops_text = f'{self.relative_flops:.2f} of the dense model\'s FLOPs per token'
    if self.policy == 'adaptive':
      return f'policy {self.describe}: {flops_text}, {self.escalated:.0%} of the tokens escalated'
    return f'policy {self.policy}, mean active fraction {self.mean_fraction:.3f}, {flops_text}'


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
  sampling.check(temperature, top_k, top_p, greedy)
  if end is not None and (tokenizer.unknown(end) or len(tokenizer.encode(end)) != 1):
    raise ValueError(f'the end text {end!r} must be one token the tokenizer knows.')
  return dict(num_tokens=num_tokens, temperature=float(temperature),
              top_k=min(top_k, tokenizer.vocab_size), top_p=float(top_p), greedy=bool(greedy),
              end_token=None if end is None else int(tokenizer.encode(end)[0]))


def _policy(config, num_tokens, policy, active_fraction, act, draft_fraction, draft_tokens,
            draft_cache, threshold, router=None) -> policies.Policy:
  """The policy object of `sample`'s arguments (one ValueError naming the problem)."""
  name = policy or ('fixed' if active_fraction is not None else 'dense')
  if name in ('dense', 'adaptive', 'speculative') and active_fraction is not None:
    raise ValueError(f'--active_fraction (active_fraction=) goes with policy fixed, not {name}.')
  if router is not None and name != 'adaptive':
    raise ValueError(f'a router (--router) goes with policy adaptive, not {name}.')
  fraction = draft_fraction if name in ('adaptive', 'speculative') else active_fraction
  act = config.activation if act is None else act
  out = policies.make(name, act, config.model, fraction=fraction, threshold=threshold,
                      draft_tokens=draft_tokens, draft_cache=draft_cache, router=router)
  decode.check_plans(out, config.model, config.model.block_size + num_tokens)
  return out


def sample(params, config: ml_collections.ConfigDict, prompts: str | Sequence[str], *,
           tokenizer, num_tokens: int = 200, seed: int = 0, batch: int = 1,
           policy: str | None = None, active_fraction: float | None = None,
           temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           end: str | None = None, act: ml_collections.ConfigDict | None = None,
           draft_fraction: float = 0.5, draft_tokens: int = 4,
           draft_cache: str = 'shared', threshold: float = 0.5,
           router: router_lib.Router | None = None) -> Samples:
  """Generates `batch` continuations of each prompt, compiled (the CLI calls this too).

  `config` is the run's config (model, activation, seed) and `tokenizer` its tokenizer
  (`runs.load_run` gives both); the model runs in the run's `config.dtype`. `policy`: dense,
  fixed (at `active_fraction`; the default when one is given), random (a fresh draw per time
  step), speculative (the full model's output, drafted `draft_tokens` at a time by the
  nested width `draft_fraction`, its keys and values `draft_cache`: rag_jax/speculative.py;
  `Samples.speculation` counts what was accepted) or adaptive (every token at the nested width
  `draft_fraction`, rerun at the full width where that width's top-1 probability is below
  `threshold`: 0 never, above 1 always; `Samples.fractions` then counts both passes of an
  escalated token; with `router`, a learned router's predicted gain above `threshold` nats
  escalates instead: rag_jax/router.py); `act` overrides
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
                   draft_tokens, draft_cache, threshold, router)
  model = runs.make_model(config, tokenizer.vocab_size)
  prompt_RxP, lengths_R, ids_R = decode.prompt_rows(tokenizer, prompts, batch, model.cfg)
  if isinstance(chosen, policies.Speculative):
    speculative.check(model.cfg, chosen.act, int(lengths_R.max()), num_tokens, chosen.fraction,
                      chosen.draft_tokens, chosen.draft_cache)
    program = speculative_generate
    knobs.update(act=chosen.act, draft_fraction=chosen.fraction,
                 draft_tokens=chosen.draft_tokens, draft_cache=chosen.draft_cache)
  else:
    program = generate
    knobs.update(policy=chosen)
  key = jax.random.fold_in(workdir_lib.root_keys(config.seed)['sample'], seed)
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
                 relative_flops=chosen.relative_flops(model.cfg, escalated),
                 escalated=escalated,
                 seconds=seconds, compile_seconds=compile_seconds, speculation=speculation)


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
                     "narrow width's top-1 probability is below this (with --router: when the "
                     'predicted gain is above this many nats).')
  flags.DEFINE_bool('router', False, "adaptive: the workdir's learned router decides "
                    '(experiments/router.py --save); --draft_fraction defaults to its width.')
  flags.DEFINE_float('escalation_share', None, 'adaptive with --router: the threshold at which '
                     'about this share of tokens escalates (from the router\'s table), instead '
                     'of --threshold.')
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
    config, tokenizer, _, params, _ = runs.load_run(f.workdir, cli.run_overrides())
    act = config.activation
    act.update(cli.activation_overrides())
    router = router_lib.load(f.workdir) if f.router else None
    draft = (router.fraction if router is not None and not f['draft_fraction'].present
             else f.draft_fraction)
    threshold = router_lib.request_threshold(
        router, f.threshold, f.escalation_share, threshold_given=f['threshold'].present,
        share_name='--escalation_share', threshold_name='--threshold')
    out = sample(params, config, f.prompt, tokenizer=tokenizer, num_tokens=f.num_tokens,
                 seed=f.seed, batch=f.batch, policy=f.policy, active_fraction=f.active_fraction,
                 temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, greedy=f.greedy,
                 end=f.end, act=act, draft_fraction=draft, draft_tokens=f.draft_tokens,
                 draft_cache=f.draft_cache, threshold=threshold, router=router)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  for text in out.text:
    print(text)
    print('-' * 40)
  print(f'{out.tokens_per_sec:.1f} tokens/s ({out.num_generated} tokens in {out.seconds:.2f} s, '
        f'compile {out.compile_seconds:.1f} s not counted); {out.summary()}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
