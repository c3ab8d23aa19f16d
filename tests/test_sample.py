import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rag_jax import activation
from rag_jax import decode
from rag_jax import plan as plan_lib
from rag_jax import sample as sample_lib
from rag_jax import sampling
from rag_jax.data import tokenizers
from rag_jax.models import gpt
from rag_jax.models import submodel

CFG = gpt.GPTConfig(vocab_size=20, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                    block_size=12)
TOKENIZER = tokenizers.CharTokenizer('abcdefghijklmnopqrst')


def act_config(**overrides) -> ml_collections.ConfigDict:
  act = activation.default_config()
  act.update(**{'enabled': True, 'lam': 0.75, 'buckets': 4, **overrides})
  return act


def run_config(**act) -> ml_collections.ConfigDict:
  """A run's config for the test model (what `sample` reads: seed, model, activation)."""
  config = ml_collections.ConfigDict({'seed': 0, 'model': {
      'num_layers': CFG.num_layers, 'num_heads': CFG.num_heads, 'embed_dim': CFG.embed_dim,
      'mlp_dim': CFG.mlp_dim, 'block_size': CFG.block_size, 'dropout': 0.0, 'use_bias': False}})
  config.activation = act_config(**act)
  return config


@pytest.fixture(scope='module')
def model_params():
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.block_size), jnp.int32))['params']
  # Sharpen the random model so that greedy choices are well separated.
  params = jax.tree.map(lambda p: p * 3.0, params)
  return model, params


@functools.partial(jax.jit, static_argnames=('model', 'plan_for'))
def _next_logits(params, window_1xT, start, length, *, model, plan_for=None):
  """The full forward pass over a context window (padded to T at the end: causal attention
  ignores the padding); the logits after its first `length` tokens."""
  plan = None if plan_for is None else plan_for(start)
  logits_1xTxV, _ = model.apply({'params': params}, window_1xT, plan=plan)
  return jax.lax.dynamic_index_in_dim(logits_1xTxV[0], length - 1, 0, False)


def reference_greedy(model, params, prompt, num_tokens, plan_for=None):
  """Re-runs the full forward pass for every token, with the sampler's documented context rule:
  when the context would exceed T tokens it restarts from the last T//2 tokens. `plan_for(start)`
  is the activation plan of the window that starts at index `start`."""
  T, window = CFG.block_size, CFG.block_size // 2
  tokens, start = list(prompt), 0
  for _ in range(num_tokens):
    u = len(tokens)
    if u - start > T:
      start = u - window
    context = tokens[start:u] + [0] * (T - (u - start))
    logits = _next_logits(params, jnp.asarray([context]), start, u - start, model=model,
                          plan_for=plan_for)
    tokens.append(int(jnp.argmax(logits)))
  return tokens


# (1, 2): fewer tokens in all than the cache rebuild's window (T // 2 - 1), which once failed to
# trace.
@pytest.mark.slow
@pytest.mark.parametrize('prompt_len,num_tokens', [(1, 2), (1, 8), (5, 7), (3, 30)])
def test_cached_greedy_equals_full_rerun(model_params, prompt_len, num_tokens):
  model, params = model_params
  prompt = list(range(1, prompt_len + 1))
  out, _ = sample_lib.generate(params, model, jnp.asarray([prompt]), jax.random.key(0),
                               num_tokens=num_tokens, greedy=True)
  assert out.shape == (1, prompt_len + num_tokens)
  assert list(np.asarray(out[0])) == reference_greedy(model, params, prompt, num_tokens)


@pytest.mark.slow
@pytest.mark.parametrize('policy,structure,sites', [
    ('fixed', 'nested', 'mlp,heads'), ('fixed', 'nested', 'mlp,heads,layers'),
    ('fixed', 'random', 'mlp,heads'), ('random', 'nested', 'mlp,heads'),
    ('random', 'random', 'mlp,heads')])
def test_cached_greedy_with_activation_equals_full_rerun(model_params, policy, structure, sites):
  """`fixed`: one plan, make_plan(act_key, fraction=a), for the whole generation. `random`: the
  token at index t is fed through the draw fold_in(act_key, t), so the reference re-runs each
  window with those per-position draws (as masks); 30 tokens cross two context refills. A fixed
  nested width runs as the smaller dense model `export.submodel` slices out (with
  `layers`: fewer blocks), which must generate what the parent generates under the plan."""
  model, params = model_params
  act = act_config(structure=structure, sites=sites)
  key = jax.random.key(4)
  _, act_key = jax.random.split(key)
  if policy == 'fixed':
    plan = activation.make_plan(act_key, act, CFG, fraction=0.5)
    assert plan_lib.active_fractions(plan)['mlp'] == 0.5
    if structure == 'nested':
      sub_params, sub_model = submodel.submodel(params, model, plan)
      assert (sub_model.cfg.num_heads, sub_model.cfg.mlp_dim) == (2, 32)
      assert sub_model.cfg.num_layers == (1 if 'layers' in sites else 2)
      assert sub_params['block_0']['attn']['key_value'].shape == (32, 2, 2, 8)  # 2 heads' K/V
    plan_for = lambda start: plan
  else:
    plan_for = lambda start: activation.per_position_plan(act_key, act, CFG, CFG.block_size,
                                                          start)
  prompt = [1, 2, 3]
  out, fractions = sample_lib.generate(
      params, model, jnp.asarray([prompt]), key, num_tokens=30, greedy=True, policy=policy,
      active_fraction=0.5 if policy == 'fixed' else None,
      act=ml_collections.FrozenConfigDict(act))
  want = reference_greedy(model, params, prompt, 30, plan_for)
  assert list(np.asarray(out[0])) == want
  assert want != reference_greedy(model, params, prompt, 30)  # the activation matters here
  if policy == 'fixed':
    np.testing.assert_allclose(fractions, 0.5)
  else:
    assert len(np.unique(fractions)) > 2


@pytest.mark.slow
def test_top_k_1_equals_greedy(model_params):
  model, params = model_params
  prompt = jnp.asarray([[3, 4, 5]])
  greedy, _ = sample_lib.generate(params, model, prompt, jax.random.key(1), num_tokens=10,
                                  greedy=True)
  top1, _ = sample_lib.generate(params, model, prompt, jax.random.key(1), num_tokens=10, top_k=1)
  np.testing.assert_array_equal(greedy, top1)


def test_top_p_keeps_the_smallest_set_over_p():
  probs = np.array([0.5, 0.25, 0.15, 0.1])
  logits = jnp.log(jnp.asarray([probs]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.vmap(lambda k, p: sample_lib.sample_token(logits, k, top_p=p)[0], (0, None))
  # p = 0.7: {0.5, 0.25} reaches 0.75 >= 0.7 -> tokens 0 and 1 only, in ratio 2:1.
  seen = np.bincount(np.asarray(draw(keys, 0.7)), minlength=4)
  assert seen[2] == seen[3] == 0 and seen[0] > 0 and seen[1] > 0
  assert abs(seen[0] / seen.sum() - 2 / 3) < 0.05
  # p = 0.75 is reached exactly by the same two tokens.
  assert set(np.unique(np.asarray(draw(keys, 0.75)))) == {0, 1}
  # p = 0.5: token 0 alone holds 0.5.
  assert set(np.unique(np.asarray(draw(keys, 0.5)))) == {0}
  # p = 0.9 needs three tokens.
  assert set(np.unique(np.asarray(draw(keys, 0.9)))) == {0, 1, 2}


def test_top_k_restricts_to_k_most_likely():
  logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]]))
  keys = jax.random.split(jax.random.key(0), 500)
  seen = set(np.unique(np.asarray(
      jax.vmap(lambda k: sample_lib.sample_token(logits, k, top_k=2)[0])(keys))))
  assert seen == {1, 3}


@pytest.mark.slow
def test_same_seed_same_text_other_seed_other_text(model_params):
  _, params = model_params
  config = run_config()
  run = lambda seed: sample_lib.sample(params, config, ['ab', 'cde'], tokenizer=TOKENIZER,
                                       num_tokens=20, seed=seed, temperature=1.5).text
  assert run(0) == run(0)
  assert run(0)[0] != run(1)[0] and run(0)[1] != run(1)[1]


@pytest.mark.slow
def test_end_token_stops_and_pads(model_params):
  model, params = model_params
  prompt = jnp.asarray([[1, 2, 3]])
  free = np.asarray(sample_lib.generate(params, model, prompt, jax.random.key(0), num_tokens=10,
                                        greedy=True)[0])[0]
  end = int(free[5])  # the third generated token
  out = np.asarray(sample_lib.generate(params, model, prompt, jax.random.key(0), num_tokens=10,
                                       greedy=True, end_token=end)[0])[0]
  first = 3 + list(free[3:]).index(end)
  np.testing.assert_array_equal(out[:first + 1], free[:first + 1])
  assert np.all(out[first + 1:] == sample_lib.PAD)


@pytest.mark.slow
@pytest.mark.parametrize('knobs', [
    dict(greedy=True, end=True),
    dict(temperature=1.0, top_k=5, policy='random'),
    dict(temperature=1.0, policy='adaptive', threshold=0.3),
])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model_params, knobs):
  """Each row's text depends on the seed, its prompt and its sample number only; 20 tokens
  cross a context refill (block 12), and rows stop at the end token on their own. `adaptive`:
  rows escalate on their own and keep the keys and values of their own width."""
  _, params = model_params
  config = run_config()
  prompts = ['a', 'bcdef', 'ghi']
  run = lambda ps, **kw: sample_lib.sample(params, config, ps, tokenizer=TOKENIZER,
                                           num_tokens=20, batch=2, **{**knobs, **kw})
  if knobs.get('end'):  # the third generated character of 'bcdef' ends the rows
    knobs = {**knobs, 'end': run(prompts, end=None).text[2][7]}
  together = run(prompts)
  alone = [run([p]) for p in prompts]
  assert together.text == [t for out in alone for t in out.text]
  np.testing.assert_array_equal(together.fractions,
                                np.concatenate([out.fractions for out in alone]))
  assert together.prompt_lengths.tolist() == [1, 1, 5, 5, 3, 3]
  if 'end' in knobs:  # greedy: both samples of a prompt agree; some rows stop early
    assert together.text[0] == together.text[1]
    assert together.lengths[2] <= 8 and together.text[2].endswith(knobs['end'])
  else:
    assert together.text[0] != together.text[1]  # samples of a prompt differ
  ended = together.lengths < together.prompt_lengths + 20
  assert np.isnan(together.fractions).any() == ended.any()
  if knobs.get('policy') == 'adaptive':  # some tokens escalated, some did not
    seen = together.fractions[~np.isnan(together.fractions)]
    assert set(np.unique(seen)) == {0.5, 1.5}


@pytest.mark.slow
def test_random_policy_fractions_follow_the_distribution(model_params):
  """One draw a = 1 - B, B ~ Beta(2, 5), per time step for all layers: the recorded fraction of
  each step is its bucket width j/4, seen as often as Beta(2, 5) puts a in ((j-1)/4, j/4]."""
  _, params = model_params
  config = run_config(alpha=2.0, beta=5.0, lam=1.0, per_layer=False)
  out = sample_lib.sample(params, config, ['a'], tokenizer=TOKENIZER, num_tokens=400,
                          policy='random', greedy=True)
  widths = np.array([0.25, 0.5, 0.75, 1.0])
  seen = [np.mean(np.isclose(out.fractions[0], w)) for w in widths]
  assert sum(seen) == 1.0
  cdf = jax.scipy.special.betainc(2.0, 5.0, 1 - np.concatenate([[0.0], widths]))
  want = np.asarray(cdf[:-1] - cdf[1:])  # P((j-1)/4 < a <= j/4)
  np.testing.assert_allclose(seen, want, atol=0.08)
  assert abs(out.mean_fraction - float(np.sum(widths * want))) < 0.05


@pytest.mark.slow
def test_sample_api_and_bad_input(model_params):
  _, params = model_params
  config = run_config()
  out = sample_lib.sample(params, config, ['abc', 'de'], tokenizer=TOKENIZER, num_tokens=5,
                          active_fraction=0.5)
  assert out.tokens.shape == (2, 12 + 5) and out.lengths.tolist() == [8, 7]
  assert [t[:3] for t in out.text] == ['abc', 'de' + out.text[1][2]]
  assert out.policy == 'fixed' and out.fractions.shape == (2, 5) and out.mean_fraction == 0.5
  assert out.tokens_per_sec > 0 and out.num_generated == 10
  bad = {
      "does not know: 'z'": dict(prompts=['abz']),
      "prompt 2: the prompt is empty": dict(prompts=['a', '']),
      "13 tokens but the model's context is 12": dict(prompts=['a' * 13]),
      'at least one prompt': dict(prompts=[]),
      'num_tokens must be an integer': dict(num_tokens=0),
      'seed must be an integer': dict(seed=-1),
      r'policy fixed needs --active_fraction': dict(policy='fixed'),
      r'goes with policy fixed, not random': dict(policy='random', active_fraction=0.5),
      'temperature must be > 0': dict(temperature=0.0),
      'top_p must be in': dict(top_p=0.0),
      "end text 'ab' must be one token": dict(end='ab'),
      'lam must be in': dict(policy='random', act=act_config(lam=2.0)),
      'buckets=3 does not divide': dict(active_fraction=0.5, act=act_config(buckets=3)),
      'adaptive escalates from a nested width': dict(policy='adaptive',
                                                     act=act_config(structure='random')),
      r'adaptive needs a draft_fraction in \(0, 1\)': dict(policy='adaptive', draft_fraction=1.0),
      'threshold must be >= 0': dict(policy='adaptive', threshold=-0.1),
  }
  for message, kwargs in bad.items():
    kwargs = {'prompts': ['abc'], **kwargs}
    with pytest.raises(ValueError, match=message):
      sample_lib.sample(params, config, kwargs.pop('prompts'), tokenizer=TOKENIZER, **kwargs)
  config.model.mlp_dim = 1 << 16  # checked before anything runs
  with pytest.raises(ValueError, match='keeps every step'):
    sample_lib.sample(params, config, ['abc'], tokenizer=TOKENIZER, policy='random',
                      num_tokens=10_000, act=act_config(structure='random'))


@pytest.mark.slow
def test_sample_runs_the_model_in_the_runs_dtype(model_params, monkeypatch):
  """`sample` builds its model as every command does (runs.make_model): a bfloat16 run decodes
  with bfloat16 activations and KV cache, a float32 run in float32."""
  _, params = model_params
  seen, generate = [], sample_lib.generate

  class Spy:
    def lower(self, params, model, *args, **kwargs):
      seen.append(model.cfg.dtype)
      return generate.lower(params, model, *args, **kwargs)

  monkeypatch.setattr(sample_lib, 'generate', Spy())
  for dtype in ('bfloat16', 'float32'):
    config = run_config()
    config.dtype = dtype
    out = sample_lib.sample(params, config, 'abc', tokenizer=TOKENIZER, num_tokens=4, greedy=True)
    assert len(out.text[0]) == 7
  assert seen == ['bfloat16', 'float32']


def test_decode_compiler_options_apply_on_cpu_only():
  """The sampler compiles with `compiler_options()`: XLA:CPU's YNNPACK fusions off on the CPU
  (README: decode speed), nothing elsewhere; an XLA that does not know the option gets none."""
  opts = decode.compiler_options()
  if jax.default_backend() == 'cpu':
    assert opts == decode.CPU_COMPILER_OPTIONS
  else:
    assert opts == {}


def reference_adaptive_greedy(model, params, prompt, num_tokens, narrow, threshold):
  """`adaptive` by re-running the whole window for every token (within one context): each
  position runs at its own width (per-position masks). The prompt's widths come from one narrow
  pass over it; a generated position runs narrow, and at the full width when the narrow top-1
  probability is below `threshold`. Returns (tokens, each position's escalation)."""
  masks = plan_lib.as_masks(narrow)
  T = CFG.block_size

  def logits_at(tokens, escalated, u):
    window = jnp.asarray([tokens + [0] * (T - len(tokens))])
    esc = jnp.asarray([escalated + [False] * (T - len(escalated))])
    logits, _ = model.apply({'params': params}, window, plan=plan_lib.escalate(masks, esc))
    return logits[0, u - 1]

  tokens = list(prompt)
  narrow_logits, _ = model.apply({'params': params}, jnp.asarray([tokens]), plan=narrow)
  escalated = list(np.asarray(sampling.confidence(narrow_logits[0]) < threshold))
  for _ in range(num_tokens):
    u = len(tokens)
    if len(escalated) < u:  # the token just generated: narrow first, escalate when unsure
      unsure = sampling.confidence(logits_at(tokens, escalated + [False], u)) < threshold
      escalated.append(bool(unsure))
    tokens.append(int(jnp.argmax(logits_at(tokens, escalated, u))))
  return tokens, escalated


@pytest.mark.slow
@pytest.mark.parametrize('sites', ['mlp,heads', 'mlp,heads,layers'])
def test_adaptive_generation_escalates_per_token_and_spans_narrow_to_full(model_params, sites):
  """Policy `adaptive` against a full re-run with each position at its own width (keys and
  values of the width the token ran at); threshold 0 is the narrow model (the `fixed` text), a
  threshold above 1 the full model (the dense text), across context refills; the recorded
  fraction of a token is the narrow one, plus 1 where it escalated."""
  model, params = model_params
  act = ml_collections.FrozenConfigDict(act_config(sites=sites))
  key = jax.random.key(4)
  narrow = activation.make_plan(jax.random.split(key)[1], act, CFG, fraction=0.5)
  prompt = [1, 2, 3]
  run = lambda **kw: sample_lib.generate(params, model, jnp.asarray([prompt]), key,
                                         greedy=True, act=act, **kw)
  threshold = 0.3
  out, fractions = run(num_tokens=8, policy='adaptive', active_fraction=0.5, threshold=threshold)
  want, escalated = reference_adaptive_greedy(model, params, prompt, 8, narrow, threshold)
  assert list(np.asarray(out[0])) == want
  np.testing.assert_allclose(fractions[0], 0.5 + np.asarray(escalated[2:10], np.float32))
  assert 0 < np.mean(escalated) < 1  # both widths ran

  for threshold, policy, fraction in ((0.0, 'fixed', 0.5), (2.0, 'dense', 1.5)):
    got, fractions = run(num_tokens=30, policy='adaptive', active_fraction=0.5,
                         threshold=threshold)
    same, _ = run(num_tokens=30, policy=policy, active_fraction=0.5 if policy == 'fixed' else None)
    np.testing.assert_array_equal(got, same)
    np.testing.assert_allclose(fractions, fraction)
