"""Training: one jitted pure `train_step(state, batch, key)` over a device mesh.

    python -m rag_jax.train --config=configs/shakespeare_char.py[:ARG] --workdir=DIR [--config.F=V]

Resumes from the newest checkpoint in DIR. Everything that can be wrong with the input (config,
data, workdir) is checked before anything is compiled, and a saved checkpoint is never replaced
by a different model or by NaNs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

from absl import app, flags
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from rag_jax import activation
from rag_jax import configuration
from rag_jax import data as data_lib
from rag_jax import evaluate as evaluate_lib
from rag_jax import workdir as workdir_lib
from rag_jax.models import gpt


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> gpt.GPT:
  return gpt.GPT(gpt.GPTConfig.from_config(config.model, vocab_size,
                                           dtype=config.get('dtype', 'float32')))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW, linear warmup then cosine decay to min_learning_rate, global-norm clipping.

  Weight decay applies to matrices and embeddings only (ndim >= 2), as in nanoGPT.
  """
  o = config.opt
  adamw = optax.adamw(make_lr_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw


def init_state(model: gpt.GPT, tx: optax.GradientTransformation, key: jax.Array,
               config: ml_collections.ConfigDict) -> TrainState:
  tokens = jnp.zeros((1, config.model.block_size), jnp.int32)
  params = model.init(key, tokens)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params, model: gpt.GPT, tokens_BxT1: jax.Array, dropout_key: jax.Array | None,
            plan: activation.Plan | None = None):
  """Mean next-token cross-entropy (float32) of windows of T+1 tokens."""
  logits_BxTxV, _ = model.apply(
      {'params': params}, tokens_BxT1[:, :-1], deterministic=dropout_key is None,
      rngs=None if dropout_key is None else {'dropout': dropout_key}, plan=plan)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), tokens_BxT1[:, 1:]).mean()


def make_train_step(model: gpt.GPT, tx: optax.GradientTransformation,
                    act: ml_collections.ConfigDict | None = None):
  """The pure step: (state, batch, train_key) -> (state, metrics).

  With random activation on (`act.enabled`), the step draws which part of the network is on
  from its activation key (shared by the batch; per layer if `act.per_layer`). `single` trains
  that sub-network; `sandwich` adds the full network's loss in the same step.
  """
  use_dropout = model.cfg.dropout > 0
  random_activation = act is not None and act.enabled and act.lam > 0

  def train_step(state: TrainState, batch: jax.Array, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)
    dropout_key, act_key = jax.random.split(step_key)  # split by purpose (DESIGN.md §1)
    dropout_key = dropout_key if use_dropout else None
    metrics = {}
    if random_activation:
      plan = activation.make_plan(act_key, act, model.cfg)
      metrics.update({f'active_{k}': v for k, v in activation.active_fractions(plan).items()})

      def total_loss(params):
        drawn = loss_fn(params, model, batch, dropout_key, plan)
        if act.train_mode == 'sandwich':
          full = loss_fn(params, model, batch, dropout_key)
          return full + drawn, (full, drawn)
        return drawn, (drawn, drawn)

      (_, (loss, drawn_loss)), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
      metrics['train_loss_drawn'] = drawn_loss
    else:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, model, batch, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update({'train_loss': loss, 'grad_norm': optax.global_norm(grads)})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


MESH_AXES = configuration.MESH_AXES
BATCH_AXES = ('data', 'fsdp')  # a batch is split over both: FSDP is data parallelism too.


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of the MESH_AXES from `config.mesh` (-1: the devices the others leave; a missing
  axis is 1). Their product may be below `num_devices` (then the first devices are used)."""
  sizes = [config.mesh.get(a, 1) for a in MESH_AXES]  # checked by configuration.validate
  fixed = math.prod(n for n in sizes if n != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise configuration.ConfigError(
          f'config.mesh: {num_devices} device(s) do not split into the fixed axis sizes '
          f'(product {fixed}); set the sizes explicitly.')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) > num_devices:
    name = 'config.mesh.data' if sizes[1:] == [1, 1] else 'config.mesh'
    value = sizes[0] if sizes[1:] == [1, 1] else dict(zip(MESH_AXES, sizes))
    raise configuration.ConfigError(
        f'{name}={value} but only {num_devices} device(s) are visible.')
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh`, with Auto (propagated) sharding axes."""
  devices = jax.devices()
  shape = mesh_shape(config, len(devices))
  n, batch_ways = math.prod(shape), shape[0] * shape[1]
  if n < len(devices) and jax.process_count() > 1:
    raise configuration.ConfigError(
        f'config.mesh uses {n} of {len(devices)} devices; a multi-process run must use all.')
  if config.batch_size % batch_ways or config.eval_batch_size % batch_ways:
    raise configuration.ConfigError(
        f'config.batch_size ({config.batch_size}) and config.eval_batch_size '
        f'({config.eval_batch_size}) must be divisible by the {batch_ways} device(s) on the '
        'data and fsdp axes; change them or set config.mesh.')
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices[:n])


def partition_spec(axes, shape, rules, mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """PartitionSpec of an array with logical `axes` (None: not a parameter, replicated).

  `rules` maps a logical name to mesh axes ('fsdp', 'data,fsdp', '' for none). A mesh axis
  serves one dimension only (the first that asks for it), axes of size 1 are dropped, and a
  dimension its mesh axes do not divide stays whole (e.g. a 65-character vocabulary).
  """
  if axes is None:
    return jax.sharding.PartitionSpec()
  used, spec = set(), []
  for name, size in zip(axes, shape):
    mesh_axes = tuple(a for a in str(rules.get(name, '') if name else '').split(',')
                      if a and a not in used and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return jax.sharding.PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Parameters and optimizer state split by logical axes (gpt.PARAM_AXES) mapped to mesh axes
  by `rules` (config.mesh.rules; None replicates them); batches split on (`data`, `fsdp`)."""
  state: Any
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding

  @classmethod
  def of(cls, mesh: jax.sharding.Mesh, abstract_state: Any, rules=None) -> 'Shardings':
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def leaf(path, x):
      if rules is None or not hasattr(x, 'shape'):
        return replicated
      spec = partition_spec(gpt.param_axes(path, len(x.shape)), x.shape, rules, mesh)
      return jax.sharding.NamedSharding(mesh, spec)

    # Adam's moments mirror the params' tree, so their leaves get the params' shardings.
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return cls(state=jax.tree_util.tree_map_with_path(leaf, abstract_state),
               batch=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes)),
               replicated=replicated)


def jit_train_step(model: gpt.GPT, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, shard: Shardings):
  """The train step jitted over the mesh, its state donated."""
  return jax.jit(make_train_step(model, tx, config.activation), donate_argnums=0,
                 in_shardings=(shard.state, shard.batch, shard.replicated),
                 out_shardings=(shard.state, shard.replicated))


class MetricsLog:
  """metrics.jsonl and TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):  # drop lines logged after the checkpoint we resume from.
      with open(self.path) as f:
        lines = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(lines)
      os.replace(self.path + '.tmp', self.path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(workdir)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
  # 1. Check every input before compiling anything.
  configuration.validate(config)
  mesh = make_mesh(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer_path = os.path.join(workdir, workdir_lib.TOKENIZER_FILE)
  resume = workdir_lib.latest_step(workdir)
  if resume is not None or os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
      workdir_lib.check_same_model(workdir_lib.load_config(workdir), config, workdir)
  tokenizer = data_lib.tokenizers.load(tokenizer_path) if resume is not None else None
  if jax.process_count() > 1:  # process 0 builds a missing dataset; the others wait for it.
    if jax.process_index() == 0:
      data_lib.prepare(config)
    multihost_utils.sync_global_devices('rag_jax: dataset prepared')
  dataset = data_lib.load(config, tokenizer)
  tokenizer = dataset.tokenizer

  model, tx = make_model(config, tokenizer.vocab_size), make_optimizer(config)
  keys = workdir_lib.root_keys(config.seed)
  init_fn = functools.partial(init_state, model, tx, config=config)
  abstract = jax.eval_shape(init_fn, keys['init'])
  shard = Shardings.of(mesh, abstract, config.mesh.get('rules'))
  mngr = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
  if resume is not None:
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shard.state)
    state = workdir_lib.restore(mngr, resume, abstract, workdir)
  else:  # created already split over the mesh: no device holds more than its shard.
    state = jax.jit(init_fn, out_shardings=shard.state)(keys['init'])
    resume = 0
  if jax.process_index() == 0:
    workdir_lib.save_config(config, workdir)
    data_lib.tokenizers.save(tokenizer, tokenizer_path)

  # 2. Compile once; run.
  train_step = jit_train_step(model, tx, config, shard)
  eval_step = jax.jit(evaluate_lib.make_eval_step(model),
                      in_shardings=(shard.state.params, shard.batch, shard.batch, shard.replicated))
  batch_sharding = shard.batch
  log = MetricsLog(workdir, resume)
  train_tokens = dataset.splits['train']
  eval_tokens = dataset.splits[config.data.eval_split]
  T, B = config.model.block_size, config.batch_size
  rows = data_lib.process_rows(batch_sharding, B)  # this process's rows of each batch
  pending, last, t_last, step_last = [], {}, None, resume
  bar = tqdm.tqdm(total=config.num_steps, initial=resume, desc='train', unit='step',
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  lr = make_lr_schedule(config)
  with jax.set_mesh(mesh):
    for step in range(resume + 1, config.num_steps + 1):
      batch = data_lib.put(data_lib.train_batch(train_tokens, B, T, config.seed, step - 1, rows),
                           batch_sharding, B)
      state, metrics = train_step(state, batch, keys['train'])
      pending.append(metrics)
      bar.update(1)
      if t_last is None:  # exclude the first step (compilation) from throughput.
        jax.block_until_ready(state)
        t_last, step_last = time.perf_counter(), step
      is_eval = step % config.eval_every == 0 or step == config.num_steps
      is_ckpt = step % config.checkpoint_every == 0 or step == config.num_steps
      if step % config.log_every and not (is_eval or is_ckpt):
        continue
      means = {k: float(np.mean(v)) for k, v in
               jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(pending)).items()}
      train_loss, pending = means['train_loss'], []
      if not math.isfinite(train_loss):
        mngr.wait_until_finished()
        raise FloatingPointError(
            f'train loss is {train_loss} at step {step}; stopping without saving it. The newest '
            f'checkpoint in {workdir} is step {mngr.latest_step()}. Lower '
            'config.opt.learning_rate or check the data.')
      now = time.perf_counter()
      last = {**means, 'learning_rate': float(lr(step - 1))}
      if step > step_last:
        last['tokens_per_sec'] = (step - step_last) * B * T / (now - t_last)
      if is_eval:
        last['eval_loss'], _ = evaluate_lib.mean_loss(eval_step, state.params, eval_tokens,
                                                      config, batch_sharding)
      log.write(step, last)
      bar.set_postfix({k: f'{last[k]:.4g}' for k in ('train_loss', 'eval_loss', 'tokens_per_sec')
                       if k in last})
      if is_ckpt:
        mngr.save(step, args=ocp.args.StandardSave(state))
      t_last, step_last = time.perf_counter(), step
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  log.close()
  return last


def make_lr_schedule(config: ml_collections.ConfigDict):
  o = config.opt
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=config.num_steps, end_value=o.min_learning_rate)


def initialize_distributed(enable: bool | None = None) -> None:
  """`jax.distributed.initialize()` for a multi-process run, before any device is touched.

  `enable=None` (the default) initializes when JAX_COORDINATOR_ADDRESS is set, taking
  JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment too (a cluster of your own, or
  several processes on one machine); `True` also lets JAX find them itself (Cloud TPU pod
  slices, SLURM, Open MPI); `False` never initializes.
  """
  env = os.environ
  if enable is False or (enable is None and 'JAX_COORDINATOR_ADDRESS' not in env):
    return
  num = env.get('JAX_NUM_PROCESSES')
  pid = env.get('JAX_PROCESS_ID')
  jax.distributed.initialize(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS'),
                             num_processes=None if num is None else int(num),
                             process_id=None if pid is None else int(pid))


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
  flags.DEFINE_bool('distributed', None,
                    'Call jax.distributed.initialize() (multi-process runs). Default: when '
                    'JAX_COORDINATOR_ADDRESS is set; pass it on TPU pod slices.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  workdir_lib.quiet_logs()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  initialize_distributed(flags.FLAGS.distributed)
  try:
    last = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(last))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=configuration.parse_flags)
