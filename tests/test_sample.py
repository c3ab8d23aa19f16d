import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax import sample as sample_lib
from rag_jax.data import tokenizers
from rag_jax.models import gpt

CFG = gpt.GPTConfig(vocab_size=20, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64,
                    block_size=12)


@pytest.fixture(scope='module')
def model_params():
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.block_size), jnp.int32))['params']
  # Sharpen the random model so that greedy choices are well separated.
  params = jax.tree.map(lambda p: p * 3.0, params)
  return model, params


def reference_greedy(model, params, prompt, num_tokens):
  """Re-runs the full forward pass for every token, with the sampler's documented context rule:
  when the context would exceed T tokens it restarts from the last T//2 tokens."""
  T, window = CFG.block_size, CFG.block_size // 2
  tokens, start = list(prompt), 0
  for _ in range(num_tokens):
    u = len(tokens)
    if u - start > T:
      start = u - window
    logits, _ = model.apply({'params': params}, jnp.asarray([tokens[start:u]]))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens


@pytest.mark.parametrize('prompt_len,num_tokens', [(1, 8), (5, 7), (3, 30)])
def test_cached_greedy_equals_full_rerun(model_params, prompt_len, num_tokens):
  model, params = model_params
  prompt = list(range(1, prompt_len + 1))
  out, _ = sample_lib.generate(params, model, jnp.asarray([prompt]), jax.random.key(0),
                               num_tokens=num_tokens, greedy=True)
  assert out.shape == (1, prompt_len + num_tokens)
  assert list(np.asarray(out[0])) == reference_greedy(model, params, prompt, num_tokens)


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


def test_same_seed_same_text_other_seed_other_text(model_params):
  model, params = model_params
  prompt = jnp.asarray([[1, 2]])
  run = lambda seed: np.asarray(sample_lib.generate(
      params, model, prompt, jax.random.key(seed), num_tokens=20, temperature=1.5)[0])
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


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
  assert np.all(out[first + 1:] == 0)  # the loop stopped; the rest stays unwritten


def test_sample_api_and_prompt_errors(model_params):
  model, params = model_params
  tok = tokenizers.CharTokenizer('abcdefghijklmnopqrst')
  out = sample_lib.sample(params, model, tok, ['abc', 'def'], 5, jax.random.key(0))
  assert out['tokens'].shape == (2, 8)
  assert [t[:3] for t in out['text']] == ['abc', 'def']
  with pytest.raises(ValueError, match="does not know: 'z'"):
    sample_lib.sample(params, model, tok, ['abz'], 5, jax.random.key(0))
  with pytest.raises(ValueError, match='empty'):
    sample_lib.sample(params, model, tok, [''], 5, jax.random.key(0))
  with pytest.raises(ValueError, match='13 tokens but the model\'s context is 12'):
    sample_lib.sample(params, model, tok, ['a' * 13], 5, jax.random.key(0))
