"""The slot engine (rag_jax/engine.py): slots at different positions, widths and settings give
each sequence exactly what it gets alone, and what the compiled sampler gives it."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rag_jax import activation
from rag_jax import engine as engine_lib
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import scheduler
from rag_jax import sample as sample_lib
from rag_jax.models import gpt
from tests.conftest import ROOT

CFG = gpt.GPTConfig(vocab_size=20, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                    block_size=12)
ACT = activation.default_config()
ACT.update(enabled=True, lam=0.75, buckets=4)
ACT = ml_collections.FrozenConfigDict(ACT)


@pytest.fixture(scope='module')
def model_params():
  model = gpt.GPT(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.block_size), jnp.int32))['params']
  return model, jax.tree.map(lambda p: p * 3.0, params)  # well separated greedy choices


def decode(engine, requests, steps, widths_at=None, escalations=None):
  """Runs `requests` [(prompt, fraction, key, settings[, threshold])] in slots 0.. ;
  `widths_at[step]`: {slot: fraction} set before that step. Returns each request's generated
  tokens (and appends to `escalations` each one's escalated flags)."""
  state, out, escalated = engine.init_state(), [], []
  for slot, (prompt, fraction, key, settings, *threshold) in enumerate(requests):
    prefix = engine.prefill(prompt, key=key, settings=settings, fraction=fraction,
                            threshold=threshold[0] if threshold else None)
    out.append([int(prefix.token[0])])
    escalated.append([bool(prefix.escalated[0])])
    state = engine.insert(prefix, state, slot)
  for step in range(steps):
    for slot, fraction in (widths_at or {}).get(step, {}).items():
      state = engine.set_width(state, slot, fraction)
    live = np.asarray(state.live)
    state, tokens = engine.generate(state)
    for slot in np.flatnonzero(live[:len(requests)]):
      out[slot].append(int(tokens[slot]))
      escalated[slot].append(bool(state.escalated[slot]))
  if escalations is not None:
    escalations.extend(escalated)
  return out


@pytest.mark.slow
def test_slots_at_their_own_positions_widths_and_settings_equal_each_alone(model_params):
  """Three sequences of different prompt lengths, widths and sampling settings, 20 tokens each
  (across the context rebuild at T = 12), in one engine of 4 slots: each gets exactly its tokens
  alone in an engine of 1 slot; greedy ones get the compiled sampler's tokens at their width."""
  model, params = model_params
  settings = [engine_lib.Settings.make(greedy=True, max_tokens=20),
              engine_lib.Settings.make(temperature=1.0, top_k=5, max_tokens=20),
              engine_lib.Settings.make(temperature=0.8, top_p=0.9, max_tokens=12)]
  requests = [([1, 2, 3], 0.5, jax.random.key(1), settings[0]),
              ([4, 5], 1.0, jax.random.key(2), settings[1]),
              ([6, 7, 8, 9, 10], 0.25, jax.random.key(3), settings[2])]
  together = decode(engine_lib.Engine(params, model, ACT, slots=4), requests, 20)
  one = engine_lib.Engine(params, model, ACT, slots=1)
  alone = [decode(one, [r], 20)[0] for r in requests]
  assert together == alone
  assert [len(t) for t in together] == [20, 20, 12]  # max_tokens per sequence
  assert together[1] != decode(one, [(*requests[1][:2], jax.random.key(9), settings[1])], 20)[0]
  ref, _ = sample_lib.generate(params, model, jnp.asarray([[1, 2, 3]]), jax.random.key(0),
                               num_tokens=20, greedy=True, policy='fixed', active_fraction=0.5,
                               act=ACT)
  assert together[0] == list(np.asarray(ref[0, 3:]))


@pytest.mark.slow
def test_a_slot_changes_width_between_steps_and_ends_at_its_end_token(model_params):
  """A sequence moved from the full width to a quarter after 4 steps decodes the same beside
  other slots as alone (every width caches every head's keys and values); its tokens after the
  move follow the narrow width. A sequence stops at its end token, which it emits."""
  model, params = model_params
  greedy = engine_lib.Settings.make(greedy=True, max_tokens=16)
  request = ([3, 1, 4], 1.0, jax.random.key(0), greedy)
  other = ([2, 7], 0.5, jax.random.key(5), greedy)
  engine = engine_lib.Engine(params, model, ACT, slots=2)
  moved = decode(engine, [request, other], 16, {4: {0: 0.25}})[0]
  assert moved == decode(engine_lib.Engine(params, model, ACT, slots=1), [request], 16,
                         {4: {0: 0.25}})[0]
  full = decode(engine, [request], 16)[0]
  assert moved[:5] == full[:5] and moved != full
  end = full[6]
  stopped = decode(engine, [(*request[:3], engine_lib.Settings.make(
      greedy=True, max_tokens=16, end_token=end))], 16)[0]
  assert stopped == full[:full.index(end) + 1]


@pytest.mark.slow
def test_the_step_without_the_adaptive_passes_decodes_fixed_slots_alike(model_params):
  """An engine with an adaptive policy whose slots are all fixed: generate_steps without the
  policy's passes (adaptive=False, as the scheduler runs it then) gives the tokens of the full
  program and of an engine without the policy, across the context rebuild (T = 12)."""
  model, params = model_params
  greedy = engine_lib.Settings.make(greedy=True, max_tokens=20)
  policy = policies.make('adaptive', ACT, fraction=0.5, threshold=0.5)
  with_policy = engine_lib.Engine(params, model, ACT, slots=2, adaptive=policy)
  plain = engine_lib.Engine(params, model, ACT, slots=2)

  def tokens(engine, **kwargs):
    state = engine.init_state()
    for slot, (prompt, fraction) in enumerate((([1, 2, 3], 0.5), ([4, 5], 1.0))):
      state = engine.insert(engine.prefill(prompt, key=jax.random.key(slot), settings=greedy,
                                           fraction=fraction), state, slot)
    return np.asarray(engine.generate_steps(state, 15, **kwargs)[1])
  want = tokens(plain)
  np.testing.assert_array_equal(tokens(with_policy, adaptive=False), want)
  np.testing.assert_array_equal(tokens(with_policy), want)


def test_adaptive_slots_decode_as_the_sampler_beside_fixed_ones(model_params):
  """Slots of the adaptive policy (narrow 0.5, escalating where its top-1 probability is below
  the slot's threshold) beside a fixed slot, 20 tokens each across the context rebuild (T = 12):
  each adaptive slot gets `sample --policy=adaptive --greedy`'s tokens at its threshold, and
  escalates where the sampler's token cost says it did (0.5 + 1 for an escalated token)."""
  model, params = model_params
  greedy = engine_lib.Settings.make(greedy=True, max_tokens=20)
  engine = engine_lib.Engine(params, model, ACT, slots=4, adaptive=policies.make(
      'adaptive', ACT, fraction=0.5, threshold=0.5))
  requests = [([1, 2, 3], 0.5, jax.random.key(1), greedy, 0.3),
              ([4, 5], 1.0, jax.random.key(2), greedy),
              ([6, 7, 8, 9, 10], 0.5, jax.random.key(3), greedy, 0.35)]
  escalations = []
  together = decode(engine, requests, 20, escalations=escalations)
  for (prompt, _, _, _, *threshold), tokens, escalated in zip(requests, together, escalations):
    if not threshold:
      assert not any(escalated)
      continue
    ref, fractions = sample_lib.generate(params, model, jnp.asarray([prompt]), jax.random.key(0),
                                         num_tokens=20, greedy=True, policy='adaptive',
                                         active_fraction=0.5, threshold=threshold[0], act=ACT)
    assert tokens == list(np.asarray(ref[0, len(prompt):]))
    np.testing.assert_allclose(0.5 + np.asarray(escalated, np.float32), fractions[0])
    assert 0 < np.mean(escalated) < 1  # both widths chose tokens
  # A router's predicted gain as the signal (random weights: some tokens pass 0, some not).
  D = CFG.embed_dim + 2
  router = router_lib.Router(router_lib.init(jax.random.key(7), D, 8, np.zeros(D), np.ones(D)),
                             0.5)
  policy = policies.make('adaptive', ACT, fraction=0.5, threshold=0.0, router=router)
  routed = engine_lib.Engine(params, model, ACT, slots=2, adaptive=policy)
  escalations = []
  got = decode(routed, [([1, 2, 3], 0.5, jax.random.key(1), greedy, 0.0), requests[1]], 20,
               escalations=escalations)[0]
  ref, fractions = sample_lib.generate(params, model, jnp.asarray([[1, 2, 3]]), jax.random.key(0),
                                       num_tokens=20, greedy=True, policy=policy)
  assert got == list(np.asarray(ref[0, 3:]))
  np.testing.assert_allclose(0.5 + np.asarray(escalations[0], np.float32), fractions[0])
  assert 0 < np.mean(escalations[0]) < 1

  with pytest.raises(ValueError, match='escalates from 0.5 here, not from 0.25'):
    engine.prefill([1], key=jax.random.key(0), settings=greedy, fraction=0.25, threshold=0.3)
  with pytest.raises(ValueError, match='decodes fixed widths only'):
    engine_lib.Engine(params, model, ACT, slots=1).prefill(
        [1], key=jax.random.key(0), settings=greedy, fraction=0.5, threshold=0.3)
  with pytest.raises(ValueError, match='both must be widths the engine serves'):
    engine_lib.Engine(params, model, ACT, slots=1, fractions=(0.5,), adaptive=engine.adaptive)


def test_prompts_prefilled_together_decode_as_one_by_one(model_params):
  """Three prompts of different lengths prefilled in one program (4 rows: the last repeats the
  first) and inserted into slots 2, 0, 3 decode exactly as each prefilled alone; the extra row
  goes nowhere."""
  model, params = model_params
  engine = engine_lib.Engine(params, model, ACT, slots=4)
  prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
  keys = [jax.random.key(i) for i in range(3)]
  settings = [engine_lib.Settings.make(greedy=True, max_tokens=8),
              engine_lib.Settings.make(temperature=1.0, max_tokens=8),
              engine_lib.Settings.make(temperature=0.7, top_k=4, max_tokens=8)]
  prefix = engine.prefill_many(prompts, keys=keys, settings=settings, fraction=0.5)
  assert prefix.live.shape == (4,)
  state = engine.insert_many(prefix, engine.init_state(), [2, 0, 3])
  assert list(np.asarray(state.live)) == [True, False, True, True]
  first = np.asarray(prefix.token)[:3]
  out = [[int(t)] for t in first]
  for _ in range(7):
    state, tokens = engine.generate(state)
    for i, slot in enumerate([2, 0, 3]):
      out[i].append(int(tokens[slot]))
  alone = decode(engine, [(p, 0.5, k, s) for p, k, s in zip(prompts, keys, settings)], 7)
  assert out == alone


def admit_three(engine):
  """Three greedy requests of 1-3 tokens submitted to a fresh scheduler on `engine` at width
  0.5 and admitted: ([(prompts, length) of each prefill_many call], each one's first tokens)."""
  calls, firsts = [], [[] for _ in range(3)]
  prefill_many = engine.prefill_many
  engine.prefill_many = lambda prompts, **kw: calls.append(
      (len(prompts), kw.get('length'))) or prefill_many(prompts, **kw)
  greedy = engine_lib.Settings.make(greedy=True, max_tokens=4)
  sched = scheduler.Scheduler(engine, scheduler.WidthController(engine.fractions))
  for i, prompt in enumerate([[1, 2], [3], [4, 5, 6]]):
    sched.submit(scheduler.Request(np.asarray(prompt), 4, greedy, jax.random.key(i), 0.5,
                                   lambda t, f, c, i=i: firsts[i].append(t) or True,
                                   lambda reason: None))
  try:
    sched._admit()  # pylint: disable=protected-access
  finally:
    engine.prefill_many = prefill_many
  return calls, firsts


def test_the_scheduler_prefills_waiting_requests_in_batches_already_compiled(model_params):
  """Three requests waiting at one width: prefilled one by one while only the one-prompt
  program has run, in one call once the 4-row one has; their first tokens are the same."""
  model, params = model_params
  engine = engine_lib.Engine(params, model, ACT, slots=4, prompt_pad=12)
  one_by_one, firsts = admit_three(engine)
  greedy = engine_lib.Settings.make(greedy=True, max_tokens=4)
  engine.prefill_many([[1]] * 4, keys=[jax.random.key(0)] * 4, settings=[greedy] * 4,
                      fraction=0.5)
  together, same = admit_three(engine)
  assert [n for n, _ in one_by_one] == [1, 1, 1] and [n for n, _ in together] == [3]
  assert firsts == same


def test_prompts_pad_to_powers_of_two_and_a_longer_compiled_prefill_takes_them(model_params):
  """Padded lengths are prompt_pad x 1, 2, 4, .. and the context; waiting prompts of one width
  go through the compiled prefill that takes the most of them (a longer one than their own
  padded length if it is there), the shortest of those; the first tokens do not change."""
  model, params = model_params  # context 12
  engine = engine_lib.Engine(params, model, ACT, slots=4, prompt_pad=2)
  assert engine.lengths() == [2, 4, 8, 12]
  assert [engine.padded_length([0] * n) for n in (1, 2, 3, 5, 9, 12)] == [2, 2, 4, 8, 12, 12]
  assert engine_lib.Engine(params, model, ACT, slots=1, prompt_pad=16).lengths() == [12]
  with pytest.raises(ValueError, match='prompt_pad must be a positive integer'):
    engine_lib.Engine(params, model, ACT, slots=1, prompt_pad=0)
  first, firsts = admit_three(engine)  # padded to 2, 2 and 4
  assert first == [(1, None), (1, 2), (1, None)]  # one at a time, each compiling or compiled
  greedy = engine_lib.Settings.make(greedy=True, max_tokens=4)
  engine.prefill_many([[1]] * 2, keys=[jax.random.key(0)] * 2, settings=[greedy] * 2,
                      fraction=0.5, length=8)
  with pytest.raises(ValueError, match='length 2 is not a padded length of at least 4'):
    engine.prefill_many([[1, 2, 3]], keys=[jax.random.key(0)], settings=[greedy], length=2)
  second, same = admit_three(engine)
  assert second == [(2, 8), (1, 4)] and firsts == same
  program = scheduler._program  # pylint: disable=protected-access
  assert program([], 3) == (1, None)
  assert program([(1, 16), (4, 16), (4, 64)], 3) == (3, 16)
  assert program([(1, 16), (2, 64)], 5) == (2, 64)
  assert program([(1, 64), (1, 16)], 1) == (1, 16)


def test_bad_engine_input_is_refused_with_one_message(model_params):
  model, params = model_params
  random_act = ml_collections.FrozenConfigDict({**ACT.to_dict(), 'structure': 'random'})
  with pytest.raises(ValueError, match="decodes nested widths; the run's structure is 'random'"):
    engine_lib.Engine(params, model, random_act, slots=2)
  with pytest.raises(ValueError, match='width 0.3 is not one the run computes'):
    engine_lib.Engine(params, model, ACT, slots=2, fractions=(0.3,))
  with pytest.raises(ValueError, match='slots must be a positive integer'):
    engine_lib.Engine(params, model, ACT, slots=0)
  engine = engine_lib.Engine(params, model, ACT, slots=2, fractions=(0.5, 1.0))
  settings = engine_lib.Settings.make()
  with pytest.raises(ValueError, match=r'width 0.25 is not one this engine serves'):
    engine.prefill([1], key=jax.random.key(0), settings=settings, fraction=0.25)
  with pytest.raises(ValueError, match='a prompt has 1 to 12 tokens'):
    engine.prefill([1] * 13, key=jax.random.key(0), settings=settings)
  with pytest.raises(ValueError, match=r'slots must be in \[0, 2\), got \[2\]'):
    engine.insert(None, None, 2)
  dense = engine_lib.Engine(params, model, None, slots=1)
  assert dense.fractions == (1.0,)


def test_the_engine_and_the_sampler_import_no_data_pipeline_evaluation_or_search():
  """Decoding sits on the model, plan, policy and sampling layers: importing the engine imports
  nothing of the data package, evaluate, search, hf_gpt2 or TFDS; the sample CLI adds only the
  tokenizers and the run loading."""
  code = ('import sys, importlib; importlib.import_module(sys.argv[1]); '
          'print(" ".join(sorted(sys.modules)))')
  forbidden = {'tensorflow_datasets', 'tensorflow', 'rag_jax.data.pipeline', 'rag_jax.evaluate',
               'rag_jax.search', 'rag_jax.hf_gpt2', 'rag_jax.export', 'rag_jax.train'}
  for module, also in (('rag_jax.engine', {'rag_jax.data', 'rag_jax.runs', 'rag_jax.workdir'}),
                       ('rag_jax.sample', set())):
    loaded = set(subprocess.run([sys.executable, '-c', code, module], check=True, cwd=ROOT,
                                capture_output=True, text=True).stdout.split())
    assert module in loaded and not loaded & (forbidden | also), loaded & (forbidden | also)
