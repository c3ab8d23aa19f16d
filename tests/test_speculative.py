"""Self-speculative decoding (rag_jax/speculative.py): greedy text equal to the full model's,
sampled text distributed as the full model's, bad settings refused before compiling."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from rag_jax import activation
from rag_jax import sample as sample_lib
from rag_jax import sampling
from rag_jax.data import tokenizers
from rag_jax.models import gpt

CFG = gpt.GPTConfig(vocab_size=20, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                    block_size=32)
TOKENIZER = tokenizers.CharTokenizer('abcdefghijklmnopqrst')
PROMPTS = ['abc', 'hello', 'q']  # different lengths in one batch


def run_config(sites='mlp,heads', structure='nested', enabled=True):
  act = activation.default_config()
  act.update(enabled=enabled, lam=0.75 if enabled else 0.0, buckets=4, sites=sites,
             structure=structure)
  config = ml_collections.ConfigDict({'seed': 0, 'model': {
      'num_layers': 2, 'num_heads': 4, 'embed_dim': 32, 'mlp_dim': 64, 'block_size': 32,
      'dropout': 0.0, 'use_bias': False}})
  config.activation = act
  return config


def params_of(scale):
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.block_size), jnp.int32))['params']
  return model, jax.tree.map(lambda p: p * scale, params)


@pytest.mark.slow
@pytest.mark.parametrize('sites,draft_cache,k,a,prompts', [
    ('mlp,heads', 'shared', 3, 0.25, PROMPTS), ('mlp,heads', 'separate', 1, 0.5, PROMPTS),
    ('mlp,heads', 'separate', 3, 0.25, PROMPTS), ('mlp,heads,layers', 'shared', 2, 0.5, PROMPTS),
    ('mlp,heads,layers', 'separate', 4, 0.5, PROMPTS),
    ('mlp,heads', 'shared', 4, 0.5, ['hello']), ('mlp,heads', 'separate', 2, 0.25, ['abc'])])
def test_greedy_speculative_is_the_full_models_greedy_text(sites, draft_cache, k, a, prompts):
  """Several rows (vmapped, each at its own position) and one row (no vmap)."""
  _, params = params_of(3.0)  # sharp: greedy choices well separated
  config = run_config(sites)
  want = sample_lib.sample(params, config, prompts, tokenizer=TOKENIZER, num_tokens=20,
                           greedy=True)
  got = sample_lib.sample(params, config, prompts, tokenizer=TOKENIZER, num_tokens=20,
                          greedy=True, policy='speculative', draft_fraction=a, draft_tokens=k,
                          draft_cache=draft_cache)
  assert got.text == want.text
  np.testing.assert_array_equal(got.tokens, want.tokens)
  iterations, proposed, accepted = got.speculation.T
  assert (proposed == k * iterations).all() and (accepted <= proposed).all()
  # Every pass commits between 1 and k + 1 tokens; the rows' 20 tokens took fewer passes
  # whenever a draft was accepted.
  assert (iterations <= 20).all() and (iterations >= -(-20 // (k + 1))).all()
  assert accepted.sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize('draft_cache', ['shared', 'separate'])
def test_greedy_speculative_goes_past_the_context_as_plain_sampling_does(draft_cache):
  """80 tokens after 5-token prompts, context 32: the caches are rebuilt as the plain sampler
  rebuilds its cache, so the text is still the full model's greedy text."""
  _, params = params_of(3.0)
  config = run_config()
  want = sample_lib.sample(params, config, PROMPTS, tokenizer=TOKENIZER, num_tokens=80,
                           greedy=True)
  got = sample_lib.sample(params, config, PROMPTS, tokenizer=TOKENIZER, num_tokens=80,
                          greedy=True, policy='speculative', draft_tokens=4,
                          draft_cache=draft_cache)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert got.speculation[:, 2].sum() > 0


@pytest.mark.slow
def test_end_token_stops_a_row_as_in_plain_sampling():
  _, params = params_of(3.0)
  config = run_config()
  plain = sample_lib.sample(params, config, PROMPTS, tokenizer=TOKENIZER, num_tokens=20,
                            greedy=True)
  end = plain.text[0][5]  # a character the first row generates
  want = sample_lib.sample(params, config, PROMPTS, tokenizer=TOKENIZER, num_tokens=20,
                           greedy=True, end=end)
  got = sample_lib.sample(params, config, PROMPTS, tokenizer=TOKENIZER, num_tokens=20,
                          greedy=True, end=end, policy='speculative', draft_tokens=3)
  assert got.text == want.text
  np.testing.assert_array_equal(got.lengths, want.lengths)
  for row, n in zip(got.tokens, got.lengths):
    assert not row[n:].any()  # PAD after the row's last token


@pytest.mark.slow
@pytest.mark.parametrize('temperature,top_k,draft_cache', [(1.0, 0, 'shared'),
                                                           (0.7, 5, 'separate')])
def test_sampled_tokens_follow_the_full_models_distribution(temperature, top_k, draft_cache):
  """The first two generated tokens of 3000 rows against the full model's exact marginals
  (chi-square); the narrow draft at a = 0.25 is often rejected, so the residual draw runs."""
  model, params = params_of(1.5)
  config = run_config()
  prompt = TOKENIZER.encode('abc').tolist()

  def exact(tokens):
    logits, _ = model.apply({'params': params}, jnp.asarray([tokens]))
    return np.asarray(jax.nn.softmax(
        sampling.processed_logits(logits[0, -1:], temperature, top_k)[0]), np.float64)

  p1 = exact(prompt)
  p2 = sum(p1[t] * exact(prompt + [t]) for t in range(20) if p1[t] > 0)
  n = 3000
  out = sample_lib.sample(params, config, 'abc', tokenizer=TOKENIZER, num_tokens=2, batch=n,
                          policy='speculative', draft_fraction=0.25, draft_tokens=2,
                          draft_cache=draft_cache, temperature=temperature, top_k=top_k)
  rate = out.speculation[:, 2].sum() / out.speculation[:, 1].sum()
  assert 0.3 < rate < 0.99, rate  # rejections happen
  for j, p in ((0, p1), (1, p2)):
    counts = np.bincount(out.tokens[:, 3 + j], minlength=20)
    keep = p > 1e-12
    assert counts[~keep].sum() == 0  # nothing outside top-k
    expected = p[keep] / p[keep].sum() * counts.sum()
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3, (j, counts, expected)


@pytest.fixture(scope='module')
def unit_params():  # module-scoped: built before `no_compile` starts listening
  return params_of(1.0)[1]


def test_bad_speculative_settings_are_refused_before_compiling(unit_params, no_compile):
  params = unit_params
  cases = [
      (dict(config=run_config(enabled=False)), 'needs a random-activation run'),
      (dict(config=run_config(structure='random')), "structure 'nested'"),
      (dict(draft_fraction=0.3), r'--draft_fraction=0.3 is not one of the widths'),
      (dict(draft_fraction=1.0), r'--draft_fraction must be in \(0, 1\)'),
      (dict(config=run_config('layers'), draft_fraction=0.25),
       '--draft_fraction=0.25 keeps no whole number of the 2 blocks'),
      (dict(draft_tokens=0), '--draft_tokens must be a positive integer'),
      (dict(draft_cache='both'), '--draft_cache must be one of'),
      (dict(draft_tokens=16), r'--draft_tokens \(16\) must be below half the context \(16\)'),
  ]
  for kw, message in cases:
    config = kw.pop('config', run_config())
    kw = {'num_tokens': 10, **kw}
    with pytest.raises(ValueError, match=message):
      sample_lib.sample(params, config, PROMPTS, tokenizer=TOKENIZER, greedy=True,
                        policy='speculative', **kw)
