"""An OpenAI-compatible completions server: one trained run, every width a model id.

    python -m rag_jax.serve --workdir=DIR [--host=127.0.0.1] [--port=8000] [--slots=8]
        [--slo_ms=50 --min_fraction=0.25] [--max_queue=64] [--max_tokens=1024]
        [--draft_fraction=0.5 --threshold=0.5 | --router]

    GET  /v1/models         the run (`RUN`), each width it computes (`RUN@0.5`, ...) and,
                            for a nested run, `RUN@adaptive`
    POST /v1/completions    prompt (one or a list), max_tokens, temperature (0: greedy), top_p,
                            stop, seed, stream; extensions: active_fraction, policy (fixed,
                            adaptive), threshold, escalation_share (with --router)
    GET  /health, /metrics  liveness; Prometheus text (requests, tokens per width, queue,
                            slot occupancy, time to first token, time per output token)

`RUN@a` (or `active_fraction=a`) pins a request to width a. `RUN` without a fraction runs at
the full width while the server keeps up; with `--slo_ms` its width falls one bucket at a time
down to `--min_fraction` while the time per output token passes the target or requests wait,
and rises when load falls (rag_jax/scheduler.py). `RUN@adaptive` (or `policy: "adaptive"`)
decodes at `--draft_fraction` and escalates a token to the full width where the narrow width's
top-1 probability is below the request's `threshold` (default `--threshold`), or, with
`--router`, where the run's router (rag_jax/router.py) predicts a larger gain than it (or
than the router's threshold for the request's `escalation_share`), as
`rag_jax.sample --policy=adaptive`. Batching never changes a request's tokens:
each sequence decodes in its own slot (rag_jax/engine.py), with the key `rag_jax.sample` uses
for the same seed, so `temperature=0` returns `sample --greedy`'s text at that width (or policy).
The usage object adds the mean active fraction (of the pass that chose each token) and the FLOPs
per token relative to the full width (an escalated token pays for both passes).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import sys
import threading
import time
import uuid

from absl import app, flags
import jax
import numpy as np
import prometheus_client as prom
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
import uvicorn

from rag_jax import cli
from rag_jax import decode
from rag_jax import engine as engine_lib
from rag_jax import policies
from rag_jax import router as router_lib
from rag_jax import runs
from rag_jax import scheduler as scheduler_lib
from rag_jax import workdir as workdir_lib

MAX_PROMPTS = 16  # prompts in one request


class BadRequest(Exception):
  def __init__(self, message: str, status: int = 400, param: str | None = None,
               kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.param, self.kind = status, param, kind


def error(message: str, status: int = 400, param: str | None = None,
          kind: str = 'invalid_request_error') -> JSONResponse:
  """An OpenAI-style error object."""
  return JSONResponse({'error': {'message': message, 'type': kind, 'param': param,
                                 'code': None}}, status_code=status)


class Metrics:
  """The Prometheus series of one server (its own registry)."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter('rag_requests', 'Completion requests by outcome.',
                                 ['outcome'], registry=r)
    self.tokens = prom.Counter('rag_tokens', 'Generated tokens by width.', ['width'], registry=r)
    self.queue = prom.Gauge('rag_queue_length', 'Requests waiting for a slot.', registry=r)
    self.busy = prom.Gauge('rag_slots_busy', 'Decode slots holding a request.', registry=r)
    self.width = prom.Gauge('rag_unpinned_width', 'Width of requests that pin none.',
                            registry=r)
    self.ttft = prom.Histogram('rag_time_to_first_token_seconds', 'Arrival to first token.',
                               registry=r)
    self.tpot = prom.Histogram('rag_time_per_output_token_seconds', 'One decode step.',
                               buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1),
                               registry=r)
    self.engine_seconds = prom.Counter(
        'rag_engine_seconds', "The scheduler's time inside engine calls (the rest of its "
        'time goes to delivering tokens, admitting requests and waiting for them).', ['call'],
        registry=r)
    self.steps = prom.Counter('rag_decode_steps', 'Decode steps run (each over every slot).',
                              registry=r)
    self.slot_steps = prom.Counter('rag_decode_slot_steps', 'Tokens the decode steps chose, '
                                   'summed over slots (over rag_decode_steps: the mean batch).',
                                   registry=r)

  def first_token(self, seconds: float):
    self.ttft.observe(seconds)

  def tokens_by_width(self, counts: dict[float, int]):
    for fraction, n in counts.items():
      self.tokens.labels(width=f'{fraction:g}').inc(n)

  def step(self, seconds: float, busy: int, steps: int = 1, slot_steps: int | None = None):
    """`steps` decode steps of `seconds` each, which chose `slot_steps` tokens in all (default:
    `busy` a step; `busy`: the slots holding a request after them)."""
    self.tpot.observe(seconds)
    self.busy.set(busy)
    self.steps.inc(steps)
    self.slot_steps.inc(steps * busy if slot_steps is None else slot_steps)

  def engine(self, call: str, seconds: float):
    self.engine_seconds.labels(call=call).inc(seconds)


@dataclasses.dataclass
class Completion:
  """One prompt's completion, filled from the scheduler's thread, read by the event loop."""
  loop: asyncio.AbstractEventLoop
  tokenizer: object
  stop: list[str]
  stream: bool  # send text as it comes (else the text is decoded once, at the end)
  tokens: list[int] = dataclasses.field(default_factory=list)
  fractions: list[float] = dataclasses.field(default_factory=list)
  flops: list[float] = dataclasses.field(default_factory=list)
  text: str = ''
  finish_reason: str | None = None
  request: scheduler_lib.Request | None = None  # set by Server.submit
  events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
  _stable: str = ''  # the text of tokens[:_cut], which later tokens cannot change
  _cut: int = 0

  def decoded(self) -> str:
    """The text of all tokens so far, decoding only those after the last character boundary
    (each token's cost does not grow with the text): a tail that ends in a character still
    incomplete (U+FFFD) stays undecided until more tokens come."""
    tail = self.tokenizer.decode(self.tokens[self._cut:])
    if tail.endswith('\ufffd'):
      return self._stable + tail
    self._stable, self._cut = self._stable + tail, len(self.tokens)
    return self._stable

  def emit(self, token: int, fraction: float, flops: float) -> bool:
    """Takes a token; sends the text that is final (text that may begin a stop string waits);
    False once a stop string appears (the text ends before it)."""
    self.tokens.append(token)
    self.fractions.append(fraction)
    self.flops.append(flops)
    if not (self.stream or self.stop):
      return True
    text = self.decoded()
    hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    if hit >= 0:
      self._send(text[:hit])
      return False
    held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
               default=0)
    self._send(text[:len(text) - held])
    return True

  def _send(self, text: str) -> None:
    new, self.text = text[len(self.text):], text
    if new and self.stream:
      self.loop.call_soon_threadsafe(self.events.put_nowait, ('text', new))

  def finish(self, reason: str) -> None:
    if reason != 'stop' and self.tokens:  # the text held back for a stop string that never came
      self._send(self.decoded())
    self.finish_reason = reason
    self.loop.call_soon_threadsafe(self.events.put_nowait, ('done', reason))


class Server:
  """The run, its engine and scheduler, and the request handlers."""

  def __init__(self, workdir: str, slots: int = 8, slo_ms: float | None = None,
               min_fraction: float = 0.0, max_queue: int = 64, max_tokens: int = 1024,
               steps: int = 4, config_overrides: dict | None = None, *,
               draft_fraction: float | None = None, threshold: float = 0.5,
               router: bool = False, prompt_pad: int = 16):
    run = runs.load_run(workdir, config_overrides)
    self.config, self.tokenizer, self.params = run.config, run.tokenizer, run.params
    act = run.config.activation
    self.name = workdir.rstrip('/').split('/')[-1] or 'run'
    T = run.model.cfg.block_size
    self.adaptive = None  # the adaptive policy (a nested run with a width below 1)
    narrow = ([(j + 1) / act.buckets for j in range(act.buckets - 1)]
              if act.enabled and act.structure == 'nested' else [])
    if narrow:
      fitted = router_lib.load(workdir) if router else None
      if fitted is not None and draft_fraction not in (None, fitted.fraction):
        raise ValueError(f'the router routes from {fitted.fraction:g}, not --draft_fraction='
                         f'{draft_fraction:g}.')
      fraction = (fitted.fraction if fitted else draft_fraction if draft_fraction is not None
                  else min(narrow, key=lambda f: abs(f - 0.5)))  # 0.5, or the nearest width
      if all(abs(f - fraction) > 1e-9 for f in narrow):
        raise ValueError(f'--draft_fraction={fraction:g} is not a width below 1 of the run '
                         f'({", ".join(f"{f:g}" for f in narrow)}).')
      self.adaptive = policies.make('adaptive', act, run.config.model, fraction=fraction,
                                    threshold=threshold, router=fitted)
    elif router or draft_fraction is not None:
      raise ValueError('--router and --draft_fraction need a nested RA run with a width below 1 '
                       '(policy adaptive).')
    self.engine = engine_lib.Engine(run.params, run.model, act if act.enabled else None,
                                    slots=slots, prompt_pad=min(prompt_pad, T),
                                    adaptive=self.adaptive)
    self.controller = scheduler_lib.WidthController(self.engine.fractions, slo_ms, min_fraction)
    self.metrics = Metrics()
    self.scheduler = scheduler_lib.Scheduler(self.engine, self.controller, max_queue,
                                             self.metrics, steps)
    self.max_tokens = max_tokens
    self.warming = False  # batched prefills still compiling (warm_up)
    self._closing = threading.Event()
    self._warm_thread: threading.Thread | None = None
    self.sample_key = workdir_lib.root_keys(run.config.seed)['sample']

  def _prefills(self):
    """(fraction, threshold) of every prefill program: the widths, then policy adaptive."""
    return [(f, None) for f in self.engine.fractions] + (
        [(self.adaptive.fraction, self.adaptive.threshold)] if self.adaptive else [])

  def warm_up(self) -> float:
    """Compiles the prefill of one prompt padded to the context at every width (and policy
    adaptive's) and the decode steps (with and without the adaptive policy's passes) before
    serving (the seconds taken); then, in a background thread while the server serves, the
    prefills of one prompt at the shorter padded lengths and of 2, 4, .. prompts at each (the
    scheduler uses the shortest and largest program that has compiled: engine.ready)."""
    start = time.perf_counter()
    state = self.engine.init_state()
    settings = engine_lib.Settings.make(max_tokens=2)
    key = self.request_key(0, np.zeros(1, np.int32))  # compiles the key's operations too
    lengths = self.engine.lengths()
    prompt = [0] * lengths[-1]  # the longest padded length takes every prompt
    for fraction, threshold in self._prefills():
      state = self.engine.insert(self.engine.prefill(
          prompt, key=key, settings=settings, fraction=fraction, threshold=threshold), state, 0)

    def batches():  # the shorter lengths, then batches of 2, 4, .. prompts, full width first
      scratch = self.engine.init_state()
      for rows in [1 << k for k in range(self.engine.slots.bit_length() + 1)
                   if 1 << k < 2 * self.engine.slots]:
        for fraction, threshold in sorted(self._prefills(), key=lambda p: -p[0]):
          for length in lengths if rows > 1 else lengths[:-1]:
            if self._closing.is_set():  # close(): stop between two programs
              return
            prefix = self.engine.prefill_many(
                [[0]] * rows, keys=[key] * rows, settings=[settings] * rows, fraction=fraction,
                thresholds=None if threshold is None else [threshold] * rows, length=length)
            scratch = self.engine.insert(prefix, scratch, 0)  # insert compiles per row count
      jax.block_until_ready(scratch.live)
      self.warming = False
    state = self.engine.set_width(state, 0, self.engine.fractions[-1])
    for adaptive in sorted({False, self.adaptive is not None}):  # the step with and without it
      state = self.engine.generate_steps(state, self.scheduler.steps, adaptive)[0]
    jax.block_until_ready(self.engine.free(state, 0).live)
    seconds = time.perf_counter() - start
    self.warming = True
    self._warm_thread = threading.Thread(target=batches, name='rag_jax-compile', daemon=True)
    self._warm_thread.start()
    return seconds

  def close(self) -> None:
    """Stops the background compilation (after the program compiling now) and waits for it:
    a process that exits while XLA compiles in another thread aborts (SIGABRT), where a
    drained server must exit 0."""
    self._closing.set()
    if self._warm_thread is not None:
      self._warm_thread.join()

  def model_ids(self) -> list[str]:
    return [self.name] + [f'{self.name}@{f:g}' for f in self.engine.fractions] + (
        [f'{self.name}@adaptive'] if self.adaptive else [])

  def parse(self, body) -> dict:
    """The request's settings, or BadRequest naming the problem."""
    if not isinstance(body, dict):
      raise BadRequest('the body must be a JSON object.')
    body = {k: v for k, v in body.items() if v is not None}  # null: the default (as OpenAI's)
    model = body.get('model', self.name)
    name, _, budget = str(model).partition('@')
    if name != self.name:
      raise BadRequest(f'model {model!r} is not served here; GET /v1/models lists '
                       f'{self.model_ids()}.', 404, 'model', 'not_found_error')
    fraction = body.get('active_fraction')
    policy = body.get('policy', 'fixed')
    if budget == 'adaptive':
      policy = 'adaptive'
    elif budget:
      try:
        fraction = float(budget)
      except ValueError:
        raise BadRequest(f'model {model!r}: the budget after @ must be a number or adaptive.',
                         404, 'model', 'not_found_error') from None
    if policy not in ('fixed', 'dense', 'adaptive'):
      raise BadRequest(f'policy {policy!r} is not served: the server decodes fixed widths (a '
                       'budget per request) and adaptive ones; rag_jax.sample runs random and '
                       'speculative.', param='policy')
    threshold = None
    if policy == 'adaptive':
      if not self.adaptive:
        raise BadRequest('policy adaptive needs a nested RA run.', param='policy')
      try:
        threshold = self.adaptive.check_threshold(router_lib.request_threshold(
            self.adaptive.router, body.get('threshold', self.adaptive.threshold),
            body.get('escalation_share'), threshold_given='threshold' in body))
      except (TypeError, ValueError) as e:
        raise BadRequest(str(e), param='escalation_share' if 'escalation_share' in body
                         else 'threshold') from None
      if fraction is not None and abs(fraction - self.adaptive.fraction) > 1e-9:
        raise BadRequest(f'policy adaptive escalates from {self.adaptive.fraction:g} on this '
                         f'server, not from {fraction!r}.', param='active_fraction')
      fraction = self.adaptive.fraction
    elif 'threshold' in body or 'escalation_share' in body:
      field = 'threshold' if 'threshold' in body else 'escalation_share'
      raise BadRequest(f'{field} goes with policy adaptive.', param=field)
    if fraction is not None:
      if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
          0 < fraction <= 1):
        raise BadRequest(f'active_fraction must be in (0, 1], got {fraction!r}.',
                         param='active_fraction')
      try:
        self.engine.width_of(float(fraction))
      except ValueError as e:
        raise BadRequest(str(e), param='active_fraction') from None
    return dict(fraction=None if fraction is None else float(fraction), threshold=threshold,
                prompts=self._prompts(body), **self._sampling(body))

  def _prompts(self, body) -> list[np.ndarray]:
    prompt = body.get('prompt')
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or len(prompts) > MAX_PROMPTS or not all(
        isinstance(p, str) for p in prompts):
      raise BadRequest(f'prompt must be a string or a list of 1 to {MAX_PROMPTS} strings.',
                       param='prompt')
    out = []
    for i, p in enumerate(prompts):
      try:
        out.append(decode.encode_prompt(self.tokenizer, p, self.engine.model.cfg))
      except ValueError as e:
        raise BadRequest(f'prompt {i}: {e}' if len(prompts) > 1 else str(e),
                         param='prompt') from None
    return out

  def _sampling(self, body) -> dict:
    max_tokens = body.get('max_tokens', 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
        1 <= max_tokens <= self.max_tokens):
      raise BadRequest(f'max_tokens must be an integer in [1, {self.max_tokens}], got '
                       f'{max_tokens!r}.', param='max_tokens')
    temperature, top_p = body.get('temperature', 1.0), body.get('top_p', 1.0)
    for name, value, ok in (('temperature', temperature, lambda v: 0 <= v <= 100),
                            ('top_p', top_p, lambda v: 0 < v <= 1)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise BadRequest(f'{name} out of range: {value!r}.', param=name)
    seed = body.get('seed', 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
      raise BadRequest(f'seed must be an integer in [0, 2**32), got {seed!r}.', param='seed')
    stop = body.get('stop') or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(
        isinstance(s, str) and s for s in stop):
      raise BadRequest('stop must be a string or a list of up to 4 non-empty strings.',
                       param='stop')
    if body.get('n', 1) != 1:
      raise BadRequest('n must be 1 (send several prompts instead).', param='n')
    return dict(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                seed=seed, stop=stop, stream=bool(body.get('stream', False)))

  def request_key(self, seed: int, prompt: np.ndarray) -> jax.Array:
    """A request's sampling key: `rag_jax.sample`'s for the same seed and prompt (sample 0)."""
    key = jax.random.split(jax.random.fold_in(self.sample_key, seed))[0]
    return jax.random.fold_in(key, decode.sample_id(prompt, 0))

  def submit(self, spec: dict, prompt: np.ndarray, loop) -> Completion:
    """Queues one prompt; its key is `rag_jax.sample`'s for the same seed (sample 0)."""
    completion = Completion(loop, self.tokenizer, spec['stop'], spec['stream'])
    key = self.request_key(spec['seed'], prompt)
    settings = engine_lib.Settings.make(
        temperature=spec['temperature'] or 1.0, top_p=spec['top_p'],
        greedy=spec['temperature'] == 0, max_tokens=spec['max_tokens'])
    request = scheduler_lib.Request(prompt, spec['max_tokens'], settings, key, spec['fraction'],
                                    completion.emit, completion.finish, spec['threshold'])
    completion.request = request
    self.scheduler.submit(request)
    return completion

  def usage(self, prompts, completions) -> dict:
    fractions = [f for c in completions for f in c.fractions]
    flops = [f for c in completions for f in c.flops]
    generated = sum(len(c.tokens) for c in completions)
    prompt_tokens = int(sum(len(p) for p in prompts))
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': generated,
            'total_tokens': prompt_tokens + generated,
            'mean_active_fraction': float(np.mean(fractions)) if fractions else None,
            'relative_flops': float(np.mean(flops)) if flops else None}


def make_app(server: Server) -> Starlette:
  """The HTTP routes over `server` (its scheduler started and stopped with the app)."""

  async def models(_):
    now = int(time.time())
    return JSONResponse({'object': 'list', 'data': [
        {'id': m, 'object': 'model', 'created': now, 'owned_by': 'rag_jax'}
        for m in server.model_ids()]})

  async def health(_):
    waiting, busy = server.scheduler.busy()
    return JSONResponse({'status': 'ok', 'waiting': waiting, 'busy_slots': busy,
                         'unpinned_width': server.controller.fraction,
                         'compiling_batched_prefills': server.warming})

  async def metrics(_):
    waiting, _ = server.scheduler.busy()
    server.metrics.queue.set(waiting)
    server.metrics.width.set(server.controller.fraction)
    return PlainTextResponse(prom.generate_latest(server.metrics.registry).decode(),
                             media_type=prom.CONTENT_TYPE_LATEST)

  async def completions(request: HttpRequest):
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      server.metrics.requests.labels(outcome='bad_request').inc()
      return error(f'the body is not valid JSON: {e}.')
    try:
      spec = server.parse(body)
      loop = asyncio.get_running_loop()
      done = []
      try:
        done = [server.submit(spec, p, loop) for p in spec['prompts']]
      except scheduler_lib.QueueFull as e:
        for c in done:
          c.request.cancelled = True
        raise BadRequest(str(e), 429, kind='rate_limit_error') from None
    except BadRequest as e:
      server.metrics.requests.labels(outcome=f'{e.status}').inc()
      return error(str(e), e.status, e.param, e.kind)
    ident = f'cmpl-{uuid.uuid4().hex[:24]}'
    model = body.get('model', server.name)
    if spec['stream']:
      return StreamingResponse(_stream(server, request, ident, model, spec, done),
                               media_type='text/event-stream')
    try:
      for c in done:
        while (await c.events.get())[0] != 'done':
          pass
    except asyncio.CancelledError:
      for c in done:
        c.request.cancelled = True
      raise
    server.metrics.requests.labels(outcome='ok').inc()
    return JSONResponse({
        'id': ident, 'object': 'text_completion', 'created': int(time.time()), 'model': model,
        'choices': [{'index': i, 'text': c.text, 'logprobs': None,
                     'finish_reason': _reason(c.finish_reason)} for i, c in enumerate(done)],
        'usage': server.usage(spec['prompts'], done)})

  @contextlib.asynccontextmanager
  async def lifespan(_):
    server.scheduler.start()
    yield
    server.scheduler.stop()

  return Starlette(routes=[
      Route('/v1/models', models), Route('/health', health), Route('/metrics', metrics),
      Route('/v1/completions', completions, methods=['POST'])], lifespan=lifespan)


def _reason(finish: str | None) -> str:
  return 'stop' if finish == 'stop' else 'length'


async def _stream(server, request, ident, model, spec, completions):
  """Server-sent events: one chunk per piece of text, then each choice's finish, then [DONE].
  A client that goes away cancels its requests (their slots free at the next step)."""
  def chunk(i, text, reason=None):
    return 'data: ' + json.dumps({
        'id': ident, 'object': 'text_completion', 'created': int(time.time()), 'model': model,
        'choices': [{'index': i, 'text': text, 'logprobs': None, 'finish_reason': reason}]}) + (
            '\n\n')
  try:
    for i, c in enumerate(completions):
      while True:
        kind, value = await c.events.get()
        if kind == 'done':
          yield chunk(i, '', _reason(value))
          break
        if value:
          yield chunk(i, value)
    server.metrics.requests.labels(outcome='ok').inc()
    yield 'data: ' + json.dumps({'id': ident, 'object': 'text_completion', 'choices': [],
                                 'usage': server.usage(spec['prompts'], completions)}) + '\n\n'
    yield 'data: [DONE]\n\n'
  finally:  # also when the client disconnects mid-stream
    for c in completions:
      if c.finish_reason is None:
        c.request.cancelled = True
        server.metrics.requests.labels(outcome='cancelled').inc()


class _Uvicorn(uvicorn.Server):
  """uvicorn, but a SIGTERM or SIGINT that drained the server ends it with status 0 (uvicorn
  re-raises the signal after its graceful shutdown, which kills the process)."""

  @contextlib.contextmanager
  def capture_signals(self):
    original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for s, handler in original.items():
        signal.signal(s, handler)


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A trained run (or an export) to serve.', required=True)
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (loopback by default).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on (0: one the system picks, printed).')
  flags.DEFINE_integer('slots', 8, 'Decode slots: requests decoded together.')
  flags.DEFINE_float('slo_ms', None, 'Target time per output token; unpinned requests narrow '
                     'while it is passed or requests wait (unset: always full width).')
  flags.DEFINE_float('min_fraction', 0.0, 'The narrowest width unpinned requests fall to.')
  flags.DEFINE_integer('max_queue', 64, 'Requests that may wait for a slot (then 429).')
  flags.DEFINE_integer('max_tokens', 1024, 'The largest max_tokens a request may ask.')
  flags.DEFINE_float('drain_s', 30.0, 'On SIGTERM: seconds to finish requests in flight.')
  flags.DEFINE_float('draft_fraction', None, 'Policy adaptive: the narrow width it escalates '
                     'from (default 0.5, or the router\'s).')
  flags.DEFINE_float('threshold', 0.5, 'Policy adaptive: the default threshold (top-1 '
                     'probability; with --router, predicted gain in nats).')
  flags.DEFINE_bool('router', False, 'Policy adaptive escalates by the run\'s router '
                    '(experiments/router.py --save) instead of the narrow width\'s confidence.')
  flags.DEFINE_integer('steps_per_call', 4, 'Decode steps per round trip from the host (more: '
                       'less host overhead per token, new requests wait longer for a slot).')
  flags.DEFINE_integer('prompt_pad', 16, 'The shortest padded prompt: prompts pad to it times '
                       '1, 2, 4, .. up to the context (a prefill program per padded length).')


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  f = flags.FLAGS
  for name, ok in (('slots', f.slots >= 1), ('max_queue', f.max_queue >= 0),
                   ('max_tokens', f.max_tokens >= 1), ('port', 0 <= f.port < 65536),
                   ('slo_ms', f.slo_ms is None or f.slo_ms > 0),
                   ('steps_per_call', f.steps_per_call >= 1), ('prompt_pad', f.prompt_pad >= 1)):
    if not ok:
      sys.exit(f'error: --{name}={getattr(f, name)} is out of range.')
  try:
    server = Server(f.workdir, f.slots, f.slo_ms, f.min_fraction, f.max_queue, f.max_tokens,
                    f.steps_per_call, cli.run_overrides(), draft_fraction=f.draft_fraction,
                    threshold=f.threshold, router=f.router, prompt_pad=f.prompt_pad)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  seconds = server.warm_up()
  # The socket is bound here (port 0: one the system picks) and handed to uvicorn, so the port
  # printed is the one served, with no window for another process to take it.
  sock = socket.socket(socket.AF_INET6 if ':' in f.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((f.host, f.port))
  except OSError as e:
    sys.exit(f'error: cannot listen on {f.host}:{f.port}: {e.strerror}.')
  sock.listen(2048)  # connections made once `serving` is printed wait for uvicorn to accept
  port = sock.getsockname()[1]
  print(f'serving {f.workdir} as {", ".join(server.model_ids())} on http://{f.host}:{port} '
        f'({f.slots} slots; compiled in {seconds:.1f} s)', flush=True)
  config = uvicorn.Config(make_app(server), log_level='warning',
                          timeout_graceful_shutdown=int(f.drain_s))
  _Uvicorn(config).run(sockets=[sock])  # SIGTERM/SIGINT: stop accepting, drain, then return
  server.close()
  print('stopped', flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
