"""Helpers shared by the benchmark scripts: statistics, XLA cost analysis, the environment."""
from __future__ import annotations

import os
import platform
import resource
import time

import jax
import ml_collections
import numpy as np

from rag_jax import configuration
from rag_jax import engine as engine_lib
from rag_jax.data import pipeline as data_lib
from rag_jax import runs
from rag_jax import sharding
from rag_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stats(ms) -> dict[str, float]:
  a = np.asarray(ms, dtype=np.float64)
  return {'median': float(np.median(a)), 'p10': float(np.percentile(a, 10)),
          'p90': float(np.percentile(a, 90)), 'mean': float(a.mean()), 'n': int(a.size)}


def xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def time_calls(fn, *args, repeats: int) -> list[float]:
  """Milliseconds of each of `repeats` synchronous calls of an already compiled `fn`."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(1e3 * (time.perf_counter() - t0))
  return out


def environment() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {'devices': [str(d) for d in jax.devices()], 'platform': jax.devices()[0].platform,
          'device_kind': jax.devices()[0].device_kind, 'host_cpus': os.cpu_count(),
          'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')}


def validation_windows(config, tokenizer, length: int, count: int):
  """`count` windows of `length` tokens (int32, [count, length]) spread evenly over the run's
  validation split (the first at its start, the last ending a token before its end). SystemExit
  when the split is shorter than a window."""
  val = data_lib.load(config, tokenizer, ('validation',)).splits['validation']
  if len(val) < length + 1:
    raise SystemExit(f'error: the validation split ({len(val)} tokens) is shorter than a window '
                     f'of {length} + 1 tokens.')
  starts = np.linspace(0, len(val) - length - 1, count).astype(int)
  return np.stack([val[s:s + length] for s in starts]).astype(np.int32)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def define_shape_flags():
  """--batch_size, --block_size, --dtype of a train-step benchmark (dense_byte_config's
  arguments); returns the three flag holders."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return (flags.DEFINE_integer('batch_size', 0, "Batch; 0: the config's (2 on CPU)."),
          flags.DEFINE_integer('block_size', 0, "Context T; 0: the config's (256 on CPU)."),
          flags.DEFINE_string('dtype', '', "Activations; '': the config's (float32 on CPU)."))


def dense_byte_config(path_with_arg: str, batch: int = 0, block: int = 0, dtype: str = ''):
  """The config's dense model on the byte tokenizer, for a train-step benchmark on random tokens:
  batch, context and dtype the config's where 0/'' on an accelerator; on a CPU, where the
  config's GPU-sized step would take minutes, 2 x 256 in float32 unless given."""
  on_cpu = jax.devices()[0].platform == 'cpu'
  config = load_config(path_with_arg)
  config.activation.enabled = False
  config.data.tokenizer = 'byte'
  if batch or on_cpu:
    config.batch_size = batch or 2
  if block or on_cpu:
    config.model.block_size = block or 256
  if dtype or on_cpu:
    config.dtype = dtype or 'float32'
  return config


def load_config(path_with_arg: str):
  """configs/NAME.py[:ARG], relative to the repository root -> ConfigDict."""
  return configuration.load_config(os.path.join(ROOT, path_with_arg))


def pinned(act: ml_collections.ConfigDict, a: float, num_heads: int) -> ml_collections.ConfigDict:
  """RA settings whose every draw is `a` (as experiments/bench_activation.py pins them): nested
  mlp and heads in 4 buckets where 4 divide the heads, else one bucket per head (6 heads:
  sixths, a = 0.5 is 3 of them)."""
  act = ml_collections.ConfigDict(act.to_dict())
  act.update(enabled=True, lam=1.0, alpha=1000.0, beta=0.001, min_active=float(a),
             sites='mlp,heads', structure='nested', buckets=4 if num_heads % 4 == 0 else num_heads,
             per_layer=True, train_mode='single')
  return act


class TrainStep:
  """A train step built as train.py builds it (mesh, shardings, `train.jit_train_step`), on a
  fixed batch of random tokens; `run(steps)` times steps (`block_until_ready` after each),
  `run_pipelined(steps)` times them dispatched back to back, as the training loop runs them."""

  def __init__(self, config, vocab_size: int, num_batches: int = 1, seed: int = 0):
    configuration.validate(config)
    mesh = sharding.make_mesh(config)
    self.model, tx = runs.make_model(config, vocab_size), runs.make_optimizer(config)
    init_fn = lambda key: runs.init_state(self.model, tx, key, config)
    shard = sharding.Shardings.of(mesh, jax.eval_shape(init_fn, jax.random.key(0)),
                               config.mesh.rules)
    self.mesh = mesh
    self.state = jax.jit(init_fn, out_shardings=shard.state)(jax.random.key(0))
    self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))
    rng = np.random.default_rng(seed)
    # `host_batches` (numpy) for a peer implementation fed the same tokens.
    self.host_batches = [
        rng.integers(0, vocab_size, (config.batch_size, config.model.block_size + 1)
                     ).astype(np.int32)
        for _ in range(num_batches)]
    self.batches = [jax.device_put(b, shard.batch) for b in self.host_batches]
    self.batch = self.batches[0]
    self.fn = train.jit_train_step(self.model, tx, config, shard)
    self.key = jax.random.key(1)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      self.compiled = self.fn.lower(self.state, self.batch, self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.xla_flops = xla_flops(self.compiled)
    self.ms, self.pipelined_ms, self.metrics, self.steps_run = [], [], None, 0
    self.run(1, record=False)  # warm-up

  def _dispatch(self) -> None:
    batch = self.batches[self.steps_run % len(self.batches)]
    self.steps_run += 1
    self.state, self.metrics = self.compiled(self.state, batch, self.key)

  def run(self, steps: int, record: bool = True) -> None:
    for _ in range(steps):
      t0 = time.perf_counter()
      self._dispatch()
      jax.block_until_ready((self.state, self.metrics))
      if record:
        self.ms.append(1e3 * (time.perf_counter() - t0))

  def run_pipelined(self, steps: int) -> None:
    """`steps` steps dispatched without waiting, one `block_until_ready` after the last: what
    `rag_jax.train`'s loop does between two log steps, where the host prepares step n+1 while
    the device runs step n. Records the mean per step of the window. On a GPU the host's part
    of a step (launching its CUDA graph, the conditionals of RA) then overlaps the device's;
    `run` (synchronous) adds it to every step."""
    jax.block_until_ready((self.state, self.metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
      self._dispatch()
    jax.block_until_ready((self.state, self.metrics))
    self.pipelined_ms.append(1e3 * (time.perf_counter() - t0) / steps)


def engine_decoding(run, slots: int, steps: int, fraction: float = 1.0, policy=None,
                    adaptive: bool = True):
  """A slot engine on `run` with every slot live and greedy at `fraction` (the prompt 'The '),
  and a function that runs `steps` decode steps in one call (returning its tokens, which the
  caller times). `policy`: the engine's adaptive policy (no slot uses it); `adaptive`:
  generate_steps' argument (False: the step without that policy's passes)."""
  act = run.config.activation
  engine = engine_lib.Engine(run.params, run.model, act if act.enabled else None, slots=slots,
                             adaptive=policy)
  state = engine.init_state()
  settings = engine_lib.Settings.make(greedy=True, max_tokens=1 << 30)
  prompt = run.tokenizer.encode('The ')
  for s in range(slots):
    state = engine.insert(engine.prefill(prompt, key=jax.random.key(s), settings=settings,
                                         fraction=fraction), state, s)
  box = [state]

  def call():
    box[0], tokens, _, _ = engine.generate_steps(box[0], steps, adaptive)
    return tokens
  return engine, call
