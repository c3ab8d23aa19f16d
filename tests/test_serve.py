"""The completions server (rag_jax/serve.py) over a real loopback socket, with the official
`openai` client: round trips, a budget by model name, equality with `sample --greedy` under
concurrent mixed widths, bad requests, a client that goes away, a full queue, SIGTERM; and the
load-adaptive width controller on a synthetic latency trace."""
import concurrent.futures
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

from rag_jax.data import pipeline as data_lib
from rag_jax import router as router_lib
from rag_jax import runs
from rag_jax import sample as sample_lib
from rag_jax import scheduler
from rag_jax import train
from tests.conftest import ROOT, load_config


class Served:
  """`python -m rag_jax.serve` in a subprocess, ready once it prints its `serving` line."""

  def __init__(self, workdir, env, *flags):
    self.proc = subprocess.Popen(  # port 0: the server binds one and prints it
        [sys.executable, '-m', 'rag_jax.serve', f'--workdir={workdir}', '--port=0', *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        break
      self.lines.append(line)
      if line.startswith('serving '):
        break
    assert self.lines and self.lines[-1].startswith('serving '), ''.join(self.lines)
    self.url = re.search(r'on (http://\S+) ', self.lines[-1]).group(1)
    self.client = openai.OpenAI(base_url=f'{self.url}/v1', api_key='none', max_retries=0)

  def post(self, body, **kw):
    return httpx.post(f'{self.url}/v1/completions', content=body if isinstance(body, str)
                      else json.dumps(body), timeout=60, **kw)

  def stop(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      self.proc.wait(60)


@pytest.fixture(scope='module')
def served_run(tmp_path_factory, tfds_dir, tfds_env):
  config = load_config('ra_shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  workdir = str(tmp_path_factory.mktemp('served') / 'ra')
  train.train_and_evaluate(config, workdir)
  server = Served(workdir, tfds_env, '--slots=4')
  yield workdir, server
  server.stop()


@pytest.mark.slow
def test_openai_client_round_trip_and_greedy_equals_sample_under_mixed_widths(served_run):
  workdir, server = served_run
  ids = [m.id for m in server.client.models.list().data]
  assert ids == ['ra', 'ra@0.25', 'ra@0.5', 'ra@0.75', 'ra@1', 'ra@adaptive']
  deadline = time.time() + 300  # requests waiting together are then prefilled together
  while httpx.get(f'{server.url}/health').json()['compiling_batched_prefills']:
    assert time.time() < deadline
    time.sleep(0.2)
  run = runs.load_run(workdir)
  jobs = [('ROMEO:', 'ra@0.5'), ('JULIET:', 'ra@0.25'), ('First Citizen:', 'ra'),
          ('KING:', 'ra@0.75'), ('ROMEO:', 'ra'), ('Nurse:', 'ra@0.5'),
          ('JULIET:', 'ra@adaptive'), ('KING:', 'ra@adaptive')]
  thresholds = {'JULIET:': 0.1, 'KING:': 0.105}  # the smoke run's top-1 is about 0.1

  def complete(job):
    prompt, model = job
    extra = {'threshold': thresholds[prompt]} if model.endswith('adaptive') else None
    return server.client.completions.create(model=model, prompt=prompt, max_tokens=40,
                                            temperature=0, extra_body=extra)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 requests, 4 slots, 5 policies
    answers = list(pool.map(complete, jobs))
  for (prompt, model), answer in zip(jobs, answers):
    budget = model.partition('@')[2]
    if budget == 'adaptive':  # escalating from 0.5 where its top-1 probability is low
      want = sample_lib.sample(run.params, run.config, prompt, tokenizer=run.tokenizer,
                               num_tokens=40, greedy=True, policy='adaptive',
                               draft_fraction=0.5, threshold=thresholds[prompt])
      escalated = float(np.mean(want.fractions) - 0.5)
      assert 0 < escalated < 1
      assert answer.usage.model_extra['mean_active_fraction'] == pytest.approx(
          0.5 + 0.5 * escalated)
      assert answer.usage.model_extra['relative_flops'] == pytest.approx(
          answers[0].usage.model_extra['relative_flops'] + escalated)  # both passes paid
    else:
      fraction = float(budget or 1)
      want = sample_lib.sample(run.params, run.config, prompt, tokenizer=run.tokenizer,
                               num_tokens=40, greedy=True,
                               active_fraction=None if fraction == 1 else fraction)
      assert answer.usage.model_extra['mean_active_fraction'] == fraction
    assert prompt + answer.choices[0].text == want.text[0], model
    assert answer.choices[0].finish_reason == 'length'
    assert answer.usage.completion_tokens == 40
  # Streaming: the same text in pieces, then the usage.
  pieces = list(server.client.completions.create(model='ra@0.5', prompt='ROMEO:', max_tokens=40,
                                                 temperature=0, stream=True))
  assert ''.join(p.choices[0].text for p in pieces if p.choices) == answers[0].choices[0].text
  # Sampled: a seed gives `sample --seed`'s text; a stop string ends the text before it.
  sampled = server.client.completions.create(model='ra', prompt='ROMEO:', max_tokens=30,
                                             temperature=0.8, seed=3)
  want = sample_lib.sample(run.params, run.config, 'ROMEO:', tokenizer=run.tokenizer,
                           num_tokens=30, temperature=0.8, seed=3)
  assert 'ROMEO:' + sampled.choices[0].text == want.text[0]
  stop = sampled.choices[0].text[5:7]
  cut = server.client.completions.create(model='ra', prompt='ROMEO:', max_tokens=30,
                                         temperature=0.8, seed=3, stop=stop)
  text = sampled.choices[0].text
  assert cut.choices[0].text == text[:text.index(stop)]
  assert cut.choices[0].finish_reason == 'stop'
  # The scheduler's time inside engine calls, for where a server's time goes (bench_serve.py).
  metrics = httpx.get(f'{server.url}/metrics').text
  for call in ('decode', 'prefill'):
    seconds = re.search(rf'rag_engine_seconds_total{{call="{call}"}} (\S+)', metrics)
    assert seconds and float(seconds.group(1)) > 0, call
  steps, slot_steps = (float(re.search(rf'^{name}_total (\S+)', metrics, re.M).group(1))
                       for name in ('rag_decode_steps', 'rag_decode_slot_steps'))
  assert steps >= 1 and 0 < slot_steps <= steps * 4  # a step chooses a token in 0 to 4 slots
  assert re.search(r'^rag_tokens_total{width="0.25"} 40.0$', metrics, re.M)  # JULIET's


@pytest.mark.slow
def test_bad_requests_get_their_status_and_the_server_goes_on(served_run):
  _, server = served_run
  cases = [
      ('{"prompt": ', 400, 'not valid JSON'),
      ({'model': 'other', 'prompt': 'a'}, 404, "model 'other' is not served"),
      ({'model': 'ra@0.3', 'prompt': 'a'}, 400, 'width 0.3 is not one this engine serves'),
      ({'prompt': 'a', 'active_fraction': 1.5}, 400, r'active_fraction must be in (0, 1]'),
      ({'prompt': 'a\u00e9'}, 400, 'does not know'),
      ({'prompt': 'a' * 500}, 400, "the model's context is"),
      ({'prompt': 'a', 'max_tokens': -1}, 400, 'max_tokens must be an integer'),
      ({'prompt': 'a', 'max_tokens': 10**9}, 400, 'max_tokens must be an integer'),
      ({'prompt': 'a', 'policy': 'speculative'}, 400, 'is not served'),
      ({'prompt': 'a', 'policy': 'adaptive', 'threshold': -1}, 400, 'threshold must be'),
      ({'prompt': 'a', 'threshold': 0.5}, 400, 'threshold goes with policy adaptive'),
      ({'prompt': 'a', 'policy': 'adaptive', 'escalation_share': 0.2}, 400,
       'escalation_share needs a learned router'),
      ({'model': 'ra@adaptive', 'prompt': 'a', 'active_fraction': 0.25}, 400,
       'escalates from 0.5 on this server'),
      ({'prompt': 'a', 'temperature': -1}, 400, 'temperature out of range'),
      ({'prompt': []}, 400, 'prompt must be a string'),
  ]
  for body, status, message in cases:
    response = server.post(body)
    assert response.status_code == status, (body, response.text)
    err = response.json()['error']
    assert message in err['message'] and err['type'], (body, err)
  assert server.client.completions.create(model='ra', prompt='a', max_tokens=3).usage
  nulls = server.post({'prompt': 'a', 'max_tokens': 3, 'seed': None, 'stop': None, 'n': None,
                       'temperature': None, 'top_p': None, 'stream': None, 'policy': None})
  assert nulls.status_code == 200, nulls.text  # null means the default, as in OpenAI's API
  metrics = httpx.get(f'{server.url}/metrics').text
  assert 'rag_requests_total{outcome="400"}' in metrics
  assert 'rag_time_per_output_token_seconds_bucket' in metrics


@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_slot(served_run):
  _, server = served_run
  with httpx.stream('POST', f'{server.url}/v1/completions', timeout=60, content=json.dumps(
      {'model': 'ra', 'prompt': 'ROMEO:', 'max_tokens': 1000, 'stream': True})) as response:
    lines = response.iter_lines()
    assert next(l for l in lines if l.startswith('data:'))
  deadline = time.time() + 10
  while httpx.get(f'{server.url}/health').json()['busy_slots'] and time.time() < deadline:
    time.sleep(0.05)
  assert httpx.get(f'{server.url}/health').json()['busy_slots'] == 0


@pytest.mark.slow
def test_a_full_queue_answers_429_and_sigterm_drains(served_run, tfds_env):
  """One slot and a queue of one: while a long streamed request holds the slot and a second
  waits, a third is refused with 429. After SIGTERM the first goes on streaming; once its client
  leaves, the waiting one is served, and the server exits 0. No step depends on timing."""
  workdir, _ = served_run
  server = Served(workdir, tfds_env, '--slots=1', '--max_queue=1', '--max_tokens=1000000')
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    with httpx.stream('POST', f'{server.url}/v1/completions', timeout=60, content=json.dumps(
        {'prompt': 'ROMEO:', 'max_tokens': 1000000, 'stream': True})) as first:
      lines = (l for l in first.iter_lines() if l.startswith('data:'))
      next(lines)  # the first request holds the slot
      second = pool.submit(server.post, {'prompt': 'JULIET:', 'max_tokens': 5})
      while httpx.get(f'{server.url}/health').json()['waiting'] == 0:
        time.sleep(0.01)
      refused = server.post({'prompt': 'KING:', 'max_tokens': 5})
      assert refused.status_code == 429 and 'waiting' in refused.json()['error']['message']
      server.proc.send_signal(signal.SIGTERM)
      assert all(next(lines) for _ in range(20))  # still streaming after SIGTERM
    answer = second.result(60)  # the first's client left: its slot went to the second
    assert answer.status_code == 200 and answer.json()['usage']['completion_tokens'] == 5
    assert server.proc.wait(60) == 0
  finally:
    pool.shutdown(wait=False)
    server.stop()


@pytest.mark.slow
def test_replicas_answer_a_request_alike_whatever_ran_before(served_run, tfds_env):
  """Two replicas of one run (different slots and steps per call), a client spreading requests
  over them round-robin as a load balancer would: each request's text, greedy or sampled with a
  seed, at each budget, is the same from either replica and from one replica again after other
  requests: a server keeps no state between requests, so replicas scale out."""
  workdir, first = served_run
  second = Served(workdir, tfds_env, '--slots=2', '--steps_per_call=1')
  jobs = [('ROMEO:', 'ra', 0.0, None), ('JULIET:', 'ra@0.5', 0.9, 7), ('KING:', 'ra@0.25', 0.0,
          None), ('Nurse:', 'ra', 0.8, 11), ('ROMEO:', 'ra@0.75', 1.0, 5)]
  replicas = [first, second]

  def complete(i):  # round i // 5, job i % 5: each job meets both replicas
    prompt, model, temperature, seed = jobs[i % len(jobs)]
    server = replicas[(i // len(jobs) + i % len(jobs)) % 2]
    return server.client.completions.create(model=model, prompt=prompt, max_tokens=20,
                                            temperature=temperature, seed=seed).choices[0].text
  try:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      texts = list(pool.map(complete, range(3 * len(jobs))))
  finally:
    second.stop()
  for j in range(len(jobs)):
    assert texts[j] == texts[j + len(jobs)] == texts[j + 2 * len(jobs)], jobs[j]
  sampled = [text for text, job in zip(texts, jobs) if job[2] > 0]
  assert len(set(sampled)) == len(sampled)  # seeded sampling, not one degenerate text


@pytest.mark.slow
def test_a_server_with_the_runs_router_decodes_as_sample_with_it(served_run, tfds_env, tmp_path):
  """`--router`: policy adaptive from the router's width (0.25 here, not the default 0.5),
  escalating where its predicted gain passes the request's threshold; greedy text equals
  `sample --policy=adaptive --router` at that threshold, with both widths choosing tokens."""
  workdir = str(tmp_path / 'routed')
  shutil.copytree(served_run[0], workdir)
  run = runs.load_run(workdir)
  # Fitted as experiments/router.py --save fits it: to the expected gain on training windows.
  score = router_lib.scorer(run.model, run.params, run.config.activation, 0.25)
  train_split = data_lib.load(run.config, run.tokenizer, ('train',)).splits['train']
  T = run.model.cfg.block_size
  feats, _, _, kl = (np.concatenate(p) for p in zip(*(
      [np.asarray(a).reshape(-1, *np.shape(a)[2:]) for a in score(
          data_lib.train_batch(train_split, 32, T, 1234, i))] for i in range(4))))
  fitted, _ = router_lib.fit(feats, kl, hidden=16, steps=100, batch=1024)
  predicted = np.asarray(router_lib.predict(fitted, feats))
  router_lib.save(workdir, fitted, 0.25, router_lib.share_thresholds(predicted))
  threshold = float(np.median(predicted))
  server = Served(workdir, tfds_env, '--slots=2', '--router')
  try:
    answer = server.client.completions.create(model='routed@adaptive', prompt='ROMEO:',
                                              max_tokens=30, temperature=0,
                                              extra_body={'threshold': threshold})
    want = sample_lib.sample(run.params, run.config, 'ROMEO:', tokenizer=run.tokenizer,
                             num_tokens=30, greedy=True, policy='adaptive', draft_fraction=0.25,
                             threshold=threshold, router=router_lib.load(workdir))
    assert 'ROMEO:' + answer.choices[0].text == want.text[0]
    escalated = float(np.mean(want.fractions) - 0.25)
    assert 0 < escalated < 1
    assert answer.usage.model_extra['mean_active_fraction'] == pytest.approx(
        0.25 + 0.75 * escalated)
    # A target share instead of a threshold: the router's saved table gives the threshold.
    by_share = server.client.completions.create(model='routed@adaptive', prompt='ROMEO:',
                                                max_tokens=30, temperature=0,
                                                extra_body={'escalation_share': 0.3})
    want = sample_lib.sample(run.params, run.config, 'ROMEO:', tokenizer=run.tokenizer,
                             num_tokens=30, greedy=True, policy='adaptive', draft_fraction=0.25,
                             threshold=router_lib.load(workdir).threshold_for(0.3),
                             router=router_lib.load(workdir))
    assert 'ROMEO:' + by_share.choices[0].text == want.text[0]
    # A router's threshold is a predicted gain in nats, which may be negative: -1000 escalates
    # every token.
    every = server.post({'model': 'routed@adaptive', 'prompt': 'ROMEO:', 'max_tokens': 5,
                         'temperature': 0, 'threshold': -1000})
    assert every.status_code == 200, every.text
    assert every.json()['usage']['mean_active_fraction'] == 1.0
    for bad, field in (({'active_fraction': 0.5}, 'active_fraction'),
                       ({'escalation_share': 0.99}, 'escalation_share'),
                       ({'escalation_share': 0.3, 'threshold': 0.1}, 'escalation_share')):
      wrong = server.post({'model': 'routed@adaptive', 'prompt': 'ROMEO:', 'max_tokens': 5,
                           **bad})
      assert wrong.status_code == 400 and wrong.json()['error']['param'] == field, wrong.text
  finally:
    server.stop()


def test_a_server_on_a_damaged_run_refuses_to_start_with_one_line(tmp_path, tfds_env):
  (tmp_path / 'config.json').write_text('{not json')
  proc = subprocess.run([sys.executable, '-m', 'rag_jax.serve', f'--workdir={tmp_path}',
                         '--port=0'], cwd=ROOT, env=tfds_env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip().startswith('error: '), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_width_controller_narrows_under_load_and_widens_after():
  """A synthetic trace of step times (ms) and waiting requests: above the 20 ms SLO or with a
  queue the width falls one bucket per decision, not below the floor; well under the SLO with no
  queue it rises back to full."""
  c = scheduler.WidthController([0.25, 0.5, 0.75, 1.0], slo_ms=20, min_fraction=0.5,
                                smoothing=1.0)
  trace = [(10, 0), (30, 0), (30, 0), (30, 0), (15, 2), (15, 0), (5, 0), (5, 0), (5, 0)]
  assert [c.observe(ms, waiting) for ms, waiting in trace] == [
      1.0, 0.75, 0.5, 0.5, 0.5, 0.5, 0.75, 1.0, 1.0]
  assert scheduler.WidthController([0.5, 1.0]).observe(1000, 10) == 1.0  # no SLO: full width
  with pytest.raises(ValueError, match='above every width'):
    scheduler.WidthController([0.25, 0.5], min_fraction=0.75)


@pytest.mark.parametrize('kind,vocab', [('char', 0), ('byte', 0), ('bpe', 300)])
def test_incremental_detokenizing_equals_decoding_everything(kind, vocab):
  """Completion.decoded() decodes only the tokens after the last character boundary, and is at
  every step the text of all tokens so far, split multibyte characters included."""
  import asyncio
  import numpy as np
  from rag_jax import serve
  from rag_jax.data import tokenizers
  text = 'Ünïcödé façade — naïve 日本語 text, repeated. ' * 20
  tok = tokenizers.build(kind, text, vocab)
  rng = np.random.default_rng(0)
  ids = list(tok.encode(text))
  ids += [int(i) for i in rng.integers(0, tok.vocab_size, 200)]  # arbitrary continuations too
  completion = serve.Completion(asyncio.new_event_loop(), tok, [], False)
  decoded_tails = 0
  for i, t in enumerate(ids):
    completion.tokens.append(t)
    assert completion.decoded() == tok.decode(ids[:i + 1]), i
    decoded_tails += completion._cut < len(completion.tokens)  # pylint: disable=protected-access
  assert completion._cut > len(ids) // 2  # pylint: disable=protected-access
  if kind == 'byte':
    assert decoded_tails > 0  # some steps ended inside a multibyte character
