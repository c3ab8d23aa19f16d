"""Continuous batching on the decode engine: requests in, tokens out, widths that give way.

One thread owns the engine (rag_jax/engine.py). Between decode steps it prefills waiting
requests into free slots; after each step it hands every live slot's token to its request and
frees the slots of finished or abandoned requests at once. Requests that pin a width (a budget)
keep it; the others run at the `WidthController`'s width, which falls one bucket at a time while
the time per output token is above the SLO or requests wait, and rises again when load falls.
Nothing here knows HTTP (rag_jax/serve.py).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from rag_jax import engine as engine_lib
from rag_jax import policies


class QueueFull(Exception):
  """More requests wait than the queue holds."""


@dataclasses.dataclass
class WidthController:
  """The width of requests that pin none: full while the server keeps up; one bucket narrower
  when the smoothed time per output token passes `slo_ms` or requests wait; one wider when it
  falls below `raise_below` x the SLO with nobody waiting. Never below `min_fraction`."""
  fractions: Sequence[float]     # the widths served, ascending
  slo_ms: float | None = None    # None: always full width
  min_fraction: float = 0.0
  raise_below: float = 0.6
  smoothing: float = 0.3         # weight of the newest step in the moving average
  level: int = -1                # index into `allowed`; starts at the full width
  ewma_ms: float | None = None

  def __post_init__(self):
    self.allowed = [f for f in sorted(self.fractions) if f >= self.min_fraction - 1e-9]
    if not self.allowed:
      raise ValueError(f'min_fraction {self.min_fraction} is above every width served '
                       f'({list(self.fractions)}).')
    self.level = len(self.allowed) - 1

  @property
  def fraction(self) -> float:
    return self.allowed[self.level]

  def observe(self, step_ms: float, waiting: int) -> float:
    """One decode step took `step_ms` with `waiting` requests queued: the width to use next."""
    self.ewma_ms = step_ms if self.ewma_ms is None else (
        self.smoothing * step_ms + (1 - self.smoothing) * self.ewma_ms)
    if self.slo_ms is None:
      return self.fraction
    if (self.ewma_ms > self.slo_ms or waiting > 0) and self.level > 0:
      self.level -= 1
      self.ewma_ms = None  # judge the new width on its own steps
    elif (self.ewma_ms < self.raise_below * self.slo_ms and waiting == 0
          and self.level < len(self.allowed) - 1):
      self.level += 1
      self.ewma_ms = None
    return self.fraction


@dataclasses.dataclass
class Request:
  """One sequence to decode. `emit(token, fraction, flops)` is called from the scheduler's
  thread for each token (the width whose pass chose it, and its FLOPs against the full width's:
  an escalated adaptive token paid for its narrow pass too), `finish(reason)` once at the end
  ('length', 'stop', 'cancelled', or an error)."""
  prompt: np.ndarray
  max_tokens: int
  settings: engine_lib.Settings
  key: jax.Array
  fraction: float | None           # None: the controller's width (adaptive: the narrow width)
  emit: Callable[[int, float, float], bool]  # False: stop here (a stop string was met)
  finish: Callable[[str], None]
  threshold: float | None = None   # the engine's adaptive policy at this threshold
  cancelled: bool = False
  arrived: float = dataclasses.field(default_factory=time.perf_counter)


class Scheduler:
  """The engine's owner: `submit` from any thread; `start` runs the loop in a thread."""

  def __init__(self, engine: engine_lib.Engine, controller: WidthController,
               max_queue: int = 64, metrics=None, steps: int = 1):
    self.engine, self.controller, self.max_queue = engine, controller, max_queue
    self.steps = steps  # decode steps per round trip from the host
    self.metrics = metrics
    self._waiting: collections.deque[Request] = collections.deque()
    self._slots: list[Request | None] = [None] * engine.slots
    self._width = [0] * engine.slots  # each slot's width (an index into engine.fractions)
    self._delivered: collections.Counter[float] = collections.Counter()  # tokens by width
    self._wake = threading.Condition()
    self._stop = False
    self._thread: threading.Thread | None = None
    self.state = engine.init_state()
    act = None if engine.act is None else policies.Act(engine.act)
    self.relative_flops = {  # FLOPs per token of each width against the full width's
        f: policies.Fixed(act=act, fraction=f).relative_flops(engine.model.cfg)
        for f in engine.fractions}

  # Any thread.

  def submit(self, request: Request) -> None:
    with self._wake:
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f'{len(self._waiting)} requests are waiting (the queue holds '
                        f'{self.max_queue}); retry later.')
      self._waiting.append(request)
      self._wake.notify()

  def busy(self) -> tuple[int, int]:
    """(waiting requests, occupied slots)."""
    with self._wake:
      return len(self._waiting), sum(r is not None for r in self._slots)

  def start(self) -> None:
    self._thread = threading.Thread(target=self.run, name='rag_jax-scheduler', daemon=True)
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    with self._wake:
      self._stop = True
      self._wake.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  # The scheduler's thread.

  def run(self) -> None:
    while True:
      with self._wake:
        while not self._stop and not self._waiting and all(r is None for r in self._slots):
          self._wake.wait(0.5)
        if self._stop:
          break
      self._admit()
      if any(r is not None for r in self._slots):
        self._step()
    for i, r in enumerate(self._slots):  # stopping: whatever still runs ends here
      if r is not None:
        self._release(i, 'cancelled')

  def _admit(self) -> None:
    """Prefills waiting requests into free slots (the oldest first), those at one width and
    policy together, in batches whose program has compiled (Server.warm_up compiles them)."""
    with self._wake:
      free = [i for i, r in enumerate(self._slots) if r is None]
      taken = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
    groups: dict[tuple[float, bool, int], list[Request]] = {}  # width, adaptive, length
    for request in taken:
      if request.cancelled:
        request.finish('cancelled')
        continue
      fraction = request.fraction or self.controller.fraction
      try:
        self.engine.check(request.prompt, fraction, request.threshold)
      except ValueError as e:
        request.finish(f'error: {e}')
        continue
      key = (fraction, request.threshold is not None, self.engine.padded_length(request.prompt))
      groups.setdefault(key, []).append(request)
    for (fraction, adaptive, length), group in groups.items():
      while group:  # in the largest batches already compiled (one prompt always runs)
        rows, pad = _program(self.engine.ready(fraction, adaptive, length), len(group))
        requests, group = group[:rows], group[rows:]
        slots, free = free[:rows], free[rows:]  # taken even if the prefill fails midway
        try:
          self._prefill(requests, fraction, adaptive, slots, pad)
        except Exception as e:  # pylint: disable=broad-except  (the server goes on)
          for request in requests:
            slot = next((i for i, r in enumerate(self._slots) if r is request), None)
            if slot is None:
              request.finish(f'error: {e}')
            else:
              self._release(slot, f'error: {e}')

  def _prefill(self, requests: list[Request], fraction: float, adaptive: bool,
               slots: list[int], length: int | None = None) -> None:
    """Requests at one width (policy) prefilled together into the free `slots`, padded to
    `length` (None: their own padded length)."""
    start = time.perf_counter()
    prefix = self.engine.prefill_many(
        [r.prompt for r in requests], keys=[r.key for r in requests],
        settings=[r.settings for r in requests], fraction=fraction,
        thresholds=[r.threshold for r in requests] if adaptive else None, length=length)
    self.state = self.engine.insert_many(prefix, self.state, slots)
    tokens, live, escalated = jax.device_get((prefix.token, prefix.live, prefix.escalated))
    if self.metrics:
      self.metrics.engine('prefill', time.perf_counter() - start)
    for i, (slot, request) in enumerate(zip(slots, requests)):
      self._width[slot] = self.engine.width_of(fraction)
      self._slots[slot] = request
      if self.metrics:
        self.metrics.first_token(time.perf_counter() - request.arrived)
      if not self._deliver(slot, int(tokens[i]), fraction, bool(escalated[i])):
        self._release(slot, 'stop')
      elif not live[i]:
        self._release(slot, 'length')
    self._count_delivered()

  def _step(self) -> None:
    """`steps` decode steps over every slot in one program, then their tokens delivered (one
    transfer from the device: the host keeps each slot's width, and a slot holding a request
    is live, as finished ones leave at once); the width of unpinned slots adjusted after."""
    start = time.perf_counter()
    adaptive = any(r is not None and r.threshold is not None for r in self._slots)
    self.state, tokens_KxS, live_KxS, escalated_KxS = self.engine.generate_steps(
        self.state, self.steps, adaptive)
    tokens_KxS, live_KxS, escalated_KxS, live_after = jax.device_get(
        (tokens_KxS, live_KxS, escalated_KxS, self.state.live))
    step_ms = 1000 * (time.perf_counter() - start) / self.steps
    if self.metrics:
      self.metrics.engine('decode', step_ms * self.steps / 1000)
    for slot, request in enumerate(self._slots):
      if request is None:
        continue
      if request.cancelled:
        self._release(slot, 'cancelled')
        continue
      fraction = self.engine.fractions[self._width[slot]]
      mine = live_KxS[:, slot]
      if not all(self._deliver(slot, int(t), fraction, bool(e)) for t, e in zip(
          tokens_KxS[mine, slot], escalated_KxS[mine, slot])):
        self._release(slot, 'stop')
      elif not live_after[slot]:
        self._release(slot, 'length')
    self._count_delivered()
    waiting, _ = self.busy()
    if self.metrics:
      self.metrics.step(step_ms / 1000, sum(r is not None for r in self._slots), self.steps,
                        int(live_KxS.sum()))
    target = self.controller.observe(step_ms, waiting)
    for slot, request in enumerate(self._slots):
      if request is not None and request.fraction is None and request.threshold is None and (
          self.engine.fractions[self._width[slot]] != target):
        self.state = self.engine.set_width(self.state, slot, target)
        self._width[slot] = self.engine.width_of(target)

  def _deliver(self, slot: int, token: int, fraction: float, escalated: bool) -> bool:
    flops = self.relative_flops[fraction] + escalated
    fraction = 1.0 if escalated else fraction
    self._delivered[fraction] += 1
    return self._slots[slot].emit(token, fraction, flops)

  def _count_delivered(self) -> None:
    """The tokens delivered since the last call, by width, to the metrics at once: a labelled
    increment takes microseconds, a few percent of a token's share of a batched step."""
    if self.metrics and self._delivered:
      self.metrics.tokens_by_width(self._delivered)
    self._delivered.clear()

  def _release(self, slot: int, reason: str) -> None:
    request, self._slots[slot] = self._slots[slot], None
    self.state = self.engine.free(self.state, slot)
    request.finish(reason)


def _program(ready: list[tuple[int, int]], waiting: int) -> tuple[int, int | None]:
  """(prompts to prefill now, padded length) for `waiting` prompts of one width and padded
  length, among the compiled prefills `ready` ((rows, length) taking them): the one that takes
  the most prompts, the shortest of those, then the fewest rows; none ready: one prompt at its
  own length (a program that compiles now)."""
  fits = [(min(R, waiting), -P, -R, P) for R, P in ready if waiting > R // 2]
  if not fits:
    return 1, None
  n, _, _, P = max(fits)
  return n, P
