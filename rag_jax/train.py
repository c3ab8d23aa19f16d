"""Training: one jitted pure `train_step(state, batch, key)` over a device mesh.

    python -m rag_jax.train --config=configs/shakespeare_char.py[:ARG] --workdir=DIR [--config.F=V]

Resumes from the newest complete checkpoint in DIR (with the config that trained it, unless
--allow_config_change). Everything that can be wrong with the input (config, data, workdir) is
checked before anything is compiled; one `train` writes a workdir at a time (DIR/train.lock);
SIGTERM or SIGINT saves the current step and stops; a saved checkpoint is never replaced by a
different model, and parameters that are not finite are never saved.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import app, flags
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
from rag_jax import cli
from rag_jax import configuration
from rag_jax.data import pipeline as data_lib
from rag_jax.data import tokenizers
from rag_jax import evaluate as evaluate_lib
from rag_jax import files
from rag_jax import losses
from rag_jax import metrics as metrics_lib
from rag_jax import plan as plan_lib
from rag_jax import reorder
from rag_jax import runs
from rag_jax import sharding
from rag_jax import weights
from rag_jax import workdir as workdir_lib
from rag_jax.errors import Interrupted, WorkdirError
from rag_jax.models import gpt


def logits_fn(params, model: gpt.GPT, tokens_BxT1: jax.Array, dropout_key: jax.Array | None,
              plan: plan_lib.Plan | None = None) -> jax.Array:
  """The float32 next-token logits of windows of T+1 tokens (inputs: the first T)."""
  logits_BxTxV, _ = model.apply(
      {'params': params}, tokens_BxT1[:, :-1], deterministic=dropout_key is None,
      rngs=None if dropout_key is None else {'dropout': dropout_key}, plan=plan)
  return logits_BxTxV.astype(jnp.float32)


def cross_entropy(logits_BxTxV: jax.Array, tokens_BxT1: jax.Array) -> jax.Array:
  """The mean next-token loss of windows of T + 1 tokens (losses.token_losses)."""
  return losses.token_losses(logits_BxTxV, tokens_BxT1[:, 1:]).mean()


def loss_fn(params, model: gpt.GPT, tokens_BxT1: jax.Array, dropout_key: jax.Array | None,
            plan: plan_lib.Plan | None = None):
  """Mean next-token cross-entropy (float32) of windows of T+1 tokens."""
  return cross_entropy(logits_fn(params, model, tokens_BxT1, dropout_key, plan), tokens_BxT1)


def narrow_loss(logits_BxTxV: jax.Array, teacher_BxTxV: jax.Array | None, tokens_BxT1: jax.Array,
                weight: float, temperature: float) -> tuple[jax.Array, jax.Array]:
  """(objective, cross-entropy) of a narrow width. In-place distillation (US-Nets, DynaBERT):
  with `weight` w > 0 the objective is (1 - w) * CE(labels) + w * T^2 * KL(teacher || narrow) at
  temperature T, the teacher being the full width's predictions, detached (no gradient reaches
  the full width through its role as a target). w = 0 is the cross-entropy alone."""
  ce = cross_entropy(logits_BxTxV, tokens_BxT1)
  if not weight:
    return ce, ce
  t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BxTxV) / temperature)
  s = jax.nn.log_softmax(logits_BxTxV / temperature)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1).mean() * temperature ** 2
  return (1 - weight) * ce + weight * kl, ce


MIXED_KEY = 1 << 20  # folded into the activation key for the mixed pass (drawn widths: 0, 1, ...)


def train_plans(act_key: jax.Array, act: ml_collections.ConfigDict,
                model_cfg) -> list[plan_lib.Plan]:
  """The plans of a training step's narrow passes (the full width, in the sandwich modes, is
  the plan None): `single` and `sandwich` one drawn width; `sandwich_rule` the smallest width
  (static) and `act.sandwich_random` drawn ones. The last is the one the step's metrics report."""
  if act.train_mode != 'sandwich_rule':
    return [activation.make_plan(act_key, act, model_cfg)]
  smallest = activation.make_plan(act_key, act, model_cfg, activation.smallest_fraction(act))
  return [smallest] + [activation.make_plan(jax.random.fold_in(act_key, i), act, model_cfg)
                       for i in range(activation.setting(act, 'sandwich_random'))]


def mixed_plan(act_key: jax.Array, act: ml_collections.ConfigDict, model_cfg,
               shape: tuple[int, int], gain_BxT: jax.Array | None = None) -> plan_lib.Plan:
  """The `mixed_share` pass's plan: the smallest width, as masks, with some (row, position) of
  windows of `shape` (B, T + 1) at the full width. `mixed_routing='random'`: each with
  probability `act.mixed_share` (a key folded from the step's activation key, apart from the
  drawn widths'); 'gain': in each row the round(mixed_share * T) positions (at least one) with
  the largest `gain_BxT` (top_share)."""
  smallest = activation.make_plan(act_key, act, model_cfg, activation.smallest_fraction(act))
  share = activation.setting(act, 'mixed_share')
  if activation.setting(act, 'mixed_routing') == 'gain':
    escalate = top_share(gain_BxT, share)
  else:
    escalate = jax.random.bernoulli(jax.random.fold_in(act_key, MIXED_KEY), share,
                                    (shape[0], shape[1] - 1))
  return plan_lib.escalate(plan_lib.as_masks(smallest), escalate)


def top_share(scores_BxT: jax.Array, share: float) -> jax.Array:
  """Per row, True at the round(share * T) positions (at least one) of highest score, as
  Mixture-of-Depths' per-sequence capacity (ties at the k-th score escalate together)."""
  k = max(1, int(round(share * scores_BxT.shape[1])))
  kth_Bx1 = jax.lax.top_k(scores_BxT, k)[0][:, -1:]
  return scores_BxT >= kth_Bx1


def make_train_step(model: gpt.GPT, tx: optax.GradientTransformation,
                    act: ml_collections.ConfigDict | None = None):
  """The pure step: (state, batch, train_key) -> (state, metrics).

  With random activation on (`act.enabled`), the step draws which part of the network is on
  from its activation key (shared by the batch; per layer if `act.per_layer`). `single` trains
  that sub-network; `sandwich` adds the full network's loss in the same step; `sandwich_rule`
  adds the full and the smallest widths to `act.sandwich_random` drawn ones (the drawn widths
  of one step use keys folded from its activation key). Losses of the passes are summed, the
  narrow ones weighted by `act.narrow_weight`; `act.mixed_share` adds the smallest width with
  some positions at the full width (mixed_plan: random ones, or those where the full width gains
  most, `act.mixed_routing`), weighted as the narrow ones. The first
  `act.full_warmup_steps` steps train the full width alone.
  """
  use_dropout = model.cfg.dropout > 0
  random_activation = activation.is_random(act)

  def train_step(state: runs.TrainState, batch: jax.Array, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)
    dropout_key, act_key = jax.random.split(step_key)  # split by purpose (docs/design.md §5)
    dropout_key = dropout_key if use_dropout else None
    metrics = {}
    if random_activation:
      plans = train_plans(act_key, act, model.cfg)
      metrics.update({f'active_{k}': v for k, v in plan_lib.active_fractions(plans[-1]).items()})
      weight = activation.setting(act, 'distill_weight')
      temperature = activation.setting(act, 'distill_temperature')
      narrow_weight = activation.setting(act, 'narrow_weight')
      mixed_share = activation.setting(act, 'mixed_share')

      def total_loss(params):
        if act.train_mode == 'single':
          drawn = loss_fn(params, model, batch, dropout_key, plans[0])
          return drawn, (drawn, drawn)
        full_logits = logits_fn(params, model, batch, dropout_key)
        full = cross_entropy(full_logits, batch)
        total, narrow_ce = full, []
        narrow_logits = [logits_fn(params, model, batch, dropout_key, plan) for plan in plans]
        for logits in narrow_logits:  # (plans[0]: the smallest width in sandwich_rule)
          objective, ce = narrow_loss(logits, full_logits, batch, weight, temperature)
          total, narrow_ce = total + narrow_weight * objective, narrow_ce + [ce]
        if mixed_share:
          gain = None  # mixed_routing 'gain': KL(full || smallest) of this step, detached
          if activation.setting(act, 'mixed_routing') == 'gain':
            gain = jax.lax.stop_gradient(losses.expected_gain(full_logits, narrow_logits[0]))
          objective, _ = narrow_loss(logits_fn(params, model, batch, dropout_key, mixed_plan(
              act_key, act, model.cfg, batch.shape, gain)), full_logits, batch, weight,
              temperature)
          total = total + narrow_weight * objective
        return total, (full, sum(narrow_ce) / len(narrow_ce))

      def random_widths(params):
        (_, (loss, drawn)), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
        return loss, drawn, grads

      warmup = activation.setting(act, 'full_warmup_steps')
      if warmup:  # the first steps train the full width alone (one branch runs: no narrow cost)
        def full_width(params):
          loss, grads = jax.value_and_grad(loss_fn)(params, model, batch, dropout_key)
          return loss, loss, grads

        in_warmup = state.step < warmup
        loss, drawn_loss, grads = jax.lax.cond(in_warmup, full_width, random_widths,
                                               state.params)
        metrics = {k: jnp.where(in_warmup, 1.0, v) for k, v in metrics.items()}
      else:
        loss, drawn_loss, grads = random_widths(state.params)
      metrics['train_loss_drawn'] = drawn_loss
    else:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, model, batch, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update({'train_loss': loss, 'grad_norm': optax.global_norm(grads)})
    return runs.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(model: gpt.GPT, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, shard: sharding.Shardings):
  """The train step jitted over the mesh, its state donated."""
  return jax.jit(make_train_step(model, tx, config.activation), donate_argnums=0,
                 in_shardings=(shard.state, shard.batch, shard.replicated),
                 out_shardings=(shard.state, shard.replicated))


def itstime(step: int, every: int, last: int) -> bool:
  """Periodic work (log, eval, checkpoint) is due every `every` steps and at the last step."""
  return step % every == 0 or step == last


class Throughput:
  """Tokens per second between two summaries, the first step (compilation) excluded."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step, self.t, self.step = tokens_per_step, None, None

  def start(self, state, step: int) -> None:
    if self.t is None:
      jax.block_until_ready(state)
      self.t, self.step = time.perf_counter(), step

  def rate(self, step: int) -> dict[str, float]:
    """Since the last `restart` (or `start`): {'tokens_per_sec': ...}, or {} at that step."""
    if step <= self.step:
      return {}
    return {'tokens_per_sec': (step - self.step) * self.tokens_per_step /
                              (time.perf_counter() - self.t)}

  def restart(self, step: int) -> None:
    """After the periodic work, so evaluation and saving do not count as training time."""
    self.t, self.step = time.perf_counter(), step


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  return {k: float(np.mean(v)) for k, v in
          jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(pending)).items()}


class StopSignals:
  """SIGTERM and SIGINT during training: finish the step, save it, stop (errors.Interrupted).

  On one process the signals are caught here; a second SIGINT stops at once
  (KeyboardInterrupt). On several processes JAX's preemption service receives SIGTERM and all
  processes agree on the step to save (orbax's `reached_preemption`, asked at every step);
  SIGINT keeps its default there, since one process cannot save alone.
  """

  def __init__(self, mngr: ocp.CheckpointManager):
    self.mngr, self.signum, self.old = mngr, None, {}
    self.multiprocess = jax.process_count() > 1

  def __enter__(self) -> 'StopSignals':
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self.old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = self.signum or signum

  def requested(self, step: int) -> bool:
    if self.multiprocess and self.mngr.reached_preemption(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __exit__(self, *exc) -> None:
    for s, handler in self.old.items():
      signal.signal(s, handler)


def _newest(mngr: ocp.CheckpointManager, workdir: str) -> str:
  step = mngr.latest_step()
  if step is None:
    return f'No checkpoint was saved in {workdir}.'
  return f'The newest checkpoint in {workdir} is step {step} (its parameters were finite).'


@contextlib.contextmanager
def _exclusive(workdir: str):
  """The workdir's TrainLock for the run's life, taken by process 0 for all its processes."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.TrainLock(workdir))
      except WorkdirError as e:
        error = e
    if jax.process_count() > 1:  # the others learn process 0's answer
      if not multihost_utils.broadcast_one_to_all(np.int32(error is None)) and error is None:
        error = WorkdirError(f'{workdir} is being trained by another rag_jax.train (process 0 '
                             'names it).')
    if error is not None:
      raise error
    yield


# Windows of the train split (batches of config.batch_size) that score the units' importance
# for `config.init_reorder`; drawn with their own seed, apart from the training batches.
REORDER_BATCHES = 8


def _reorder_batches(dataset: data_lib.Dataset, config) -> list[np.ndarray]:
  T, B = config.model.block_size, config.batch_size
  return [data_lib.train_batch(dataset.splits['train'], B, T, config.seed + 1, i)
          for i in range(REORDER_BATCHES)]


def reordered(source: runs.Run, dataset: data_lib.Dataset, config) -> runs.Run:
  """`source` with every layer's MLP units and heads most important first (rag_jax/reorder.py),
  scored on windows of `dataset`'s train split; `config.init_from` names it."""
  params, _ = reorder.by_importance(source.model, jax.device_get(source.params),
                                    _reorder_batches(dataset, config))
  workdir_lib.notice(f'reordered the MLP units and heads of {config.init_from} by importance '
                     f'({REORDER_BATCHES * config.batch_size} windows of the train split).')
  return source._replace(params=params)


def warmup_reordered(state: runs.TrainState, model: gpt.GPT, dataset: data_lib.Dataset, config,
                     shard: sharding.Shardings) -> runs.TrainState:
  """`state` after the full-width warm-up's last step with every layer's MLP units and heads
  most important first (`config.activation.warmup_reorder`): the parameters and the optimizer's
  moments permuted alike, so training goes on from the same function, and the nested widths
  that start to train now start from the best prefix."""
  params = multihost_utils.process_allgather(state.params, tiled=True)
  order, _ = reorder.importance_order(model, params, _reorder_batches(dataset, config))

  def permute(s: runs.TrainState) -> runs.TrainState:
    return runs.TrainState(step=s.step, params=reorder.permute(s.params, order),
                           opt_state=reorder.permute_like_params(s.opt_state, s.params, order))

  workdir_lib.notice(f'step {int(state.step)}: the full-width warm-up ends; reordered the MLP '
                     'units and heads by importance (parameters and optimizer state, '
                     f'{REORDER_BATCHES * config.batch_size} windows of the train split).')
  return jax.jit(permute, out_shardings=shard.state)(state)


def check_config(config: ml_collections.ConfigDict, given=()) -> None:
  """What a run's config must pass before anything is built, the same for `train` and for every
  run of a sweep (experiments/sweep.py, before the first one starts): the fields
  (configuration.validate, finite numbers among them), activation fields `given` (dotted names
  set on the command line or by the sweep) on a dense config, and the corpus being there.
  Raises ConfigError or DataError."""
  configuration.validate(config)
  configuration.check_activation_overrides(given, config)
  data_lib.check_source(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False, given=()) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  Raises errors.Interrupted after saving the current step when SIGTERM or SIGINT arrives,
  FloatingPointError (nothing saved) when the loss or the parameters to save are not finite,
  and a ConfigError, DataError or WorkdirError, before anything is compiled or written, for bad
  input. `allow_config_change`: resume with a config that differs from the workdir's in more
  than configuration.RESUME_FREE_FIELDS (recorded in config_changes.jsonl). `given`: the fields
  the command line set (check_config).
  """
  check_config(config, given)
  mesh = sharding.make_mesh(config)
  workdir_lib.check_reachable(workdir)
  created = not files.exists(workdir)
  workdir_lib.check_writable(workdir, create=True)
  if weights.is_export(workdir):
    raise WorkdirError(f'{workdir} holds a model written by rag_jax.export or rag_jax.convert, not '
                       f'a run; fine-tune it in a new --workdir with --config.init_from={workdir}.')
  workdir_lib.claim(workdir, config, mark=False)  # before the lock file is made in it
  try:
    with _exclusive(workdir):
      workdir_lib.claim(workdir, config, mark=jax.process_index() == 0)
      return _train(config, workdir, mesh, allow_config_change)
  except BaseException:
    if created and jax.process_index() == 0:  # refused before it wrote anything: no leftovers
      workdir_lib.remove_if_unused(workdir)
    raise


def _check_inputs(config, workdir, allow_config_change) -> dict[str, Any]:
  """Step 1 of a run, before anything compiles: unfinished checkpoints removed, the saved
  config checked against this one, the init_from model and the data loaded. Returns resume (the
  newest step or None), saved (its config), changes, tokenizer, dataset, source (init_from)."""
  removed = workdir_lib.remove_unfinished_checkpoints(workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('rag_jax: unfinished checkpoints removed')
  resume = workdir_lib.latest_step(workdir)
  for step in removed:
    workdir_lib.notice(f'removed the unfinished checkpoint of step {step} (its run stopped while '
                       'saving it).')
  saved, changes = None, {}
  if resume is not None:
    saved = workdir_lib.load_config(workdir)
    changes = workdir_lib.check_resume(saved, config, workdir, resume, allow_config_change)
  tokenizer = (tokenizers.load(os.path.join(workdir, workdir_lib.TOKENIZER_FILE))
               if resume is not None else None)
  source = None
  if resume is None and config.get('init_from'):  # a fresh run from another model's parameters
    source = runs.load_init(config)
    tokenizer = source.tokenizer
  splits = tuple(dict.fromkeys(('train', config.data.eval_split)))
  if jax.process_count() > 1:  # process 0 builds a missing dataset and token cache; the others
    if jax.process_index() == 0:  # wait for it, then memory-map the same files.
      data_lib.load(config, tokenizer, splits)
    multihost_utils.sync_global_devices('rag_jax: dataset prepared')
  dataset = data_lib.load(config, tokenizer, splits)
  if source is not None and config.get('init_reorder'):
    source = reordered(source, dataset, config)
  return dict(resume=resume, saved=saved, changes=changes, tokenizer=dataset.tokenizer,
              dataset=dataset, source=source)


def _initial_state(config, workdir, inputs, mngr, placed, shard, tx, init_fn, init_key):
  """The state a run starts from: its newest checkpoint, the init_from model's parameters, or a
  fresh initialisation (created already split over the mesh: no device holds more than its
  shard)."""
  resume, source, changes = inputs['resume'], inputs['source'], inputs['changes']
  if resume is not None:
    state = workdir_lib.restore(mngr, resume, placed, workdir)
    runs.check_finite(state.params, workdir, resume)
    workdir_lib.notice(f'resuming from step {resume}, the newest complete checkpoint in '
                       f'{workdir}' + (f'; config changes: {", ".join(changes)}' if changes
                                       else '') + '.')
    return state
  if source is not None:  # another model's parameters, placed shard by shard
    params = runs.init_params_from(source, placed.params)
    inputs['source'] = None  # its host copy is no longer needed
    workdir_lib.notice(f'starting from the parameters of {config.init_from} (step '
                       f'{source.step}).')
    return jax.jit(functools.partial(runs.state_from, tx=tx), out_shardings=shard.state)(params)
  return jax.jit(init_fn, out_shardings=shard.state)(init_key)


def _train(config, workdir, mesh, allow_config_change):
  inputs = _check_inputs(config, workdir, allow_config_change)  # 1. before compiling anything
  tokenizer, resume = inputs['tokenizer'], inputs['resume']
  model, tx = runs.make_model(config, tokenizer.vocab_size), runs.make_optimizer(config)
  keys = workdir_lib.root_keys(config.seed)
  init_fn = functools.partial(runs.init_state, model, tx, config=config)
  abstract = jax.eval_shape(init_fn, keys['init'])
  shard = sharding.Shardings.of(mesh, abstract, config.mesh.get('rules'))
  mngr = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
  log = bar = None
  try:
    # The state's shapes with their shardings: restored into, or filled from init_from.
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shard.state)
    state = _initial_state(config, workdir, inputs, mngr, placed, shard, tx, init_fn,
                           keys['init'])
    resume = resume or 0
    if resume >= config.num_steps:
      workdir_lib.notice(f'the run is at step {resume} of config.num_steps={config.num_steps}: '
                         'nothing to train (raise num_steps to go on).')
    if jax.process_index() == 0:
      workdir_lib.record_config_change(workdir, resume, inputs['saved'], inputs['changes'])
      workdir_lib.save_config(config, workdir)
      tokenizers.save(tokenizer, os.path.join(workdir, workdir_lib.TOKENIZER_FILE))

    # 2. Compile once; run.
    train_step = jit_train_step(model, tx, config, shard)
    eval_step = jax.jit(evaluate_lib.make_eval_step(model), in_shardings=(
        shard.state.params, shard.batch, shard.batch, shard.replicated))
    log = metrics_lib.MetricsLog(workdir, resume, config)
    profiler = metrics_lib.Profiler(config, workdir)
    if resume < config.num_steps:
      workdir_lib.notice('compiling the train step; the first step includes it.')
    bar = tqdm.tqdm(total=config.num_steps, initial=resume, desc='train', unit='step',
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    with jax.set_mesh(mesh), StopSignals(mngr) as signals:
      warmup_end = None
      if config.activation.enabled and activation.setting(config.activation, 'warmup_reorder'):
        warmup_end = functools.partial(warmup_reordered, model=model, dataset=inputs['dataset'],
                                       config=config, shard=shard)
      last = _run_steps(config, workdir, state, resume, inputs['dataset'], shard, keys['train'],
                        train_step, eval_step, mngr, log, profiler, bar, signals, warmup_end)
    mngr.wait_until_finished()
    return last
  finally:
    if bar is not None:
      bar.close()
    mngr.close()  # waits for a save in flight, also on errors
    if log is not None:  # the run started: its checkpoints' checksums (none touched before)
      log.close()
      profiler.stop()
      try:
        workdir_lib.seal_checkpoints(workdir)
      except OSError as e:  # a full disk must not hide why the run stopped
        workdir_lib.notice(f'could not record the checksums of the checkpoints ({e}).')


def _run_steps(config, workdir, state, resume, dataset, shard, train_key, train_step, eval_step,
               mngr, log, profiler, bar, signals, warmup_end=None) -> dict[str, float]:
  """Steps resume + 1 .. num_steps: metrics logged, evaluated and saved on their schedules, a
  stop signal saving first; `warmup_end(state)` replaces the state after the full-width
  warm-up's last step (before that step's evaluation and save). Returns the last logged
  metrics."""
  train_tokens, eval_tokens = dataset.splits['train'], dataset.splits[config.data.eval_split]
  T, B, N = config.model.block_size, config.batch_size, config.num_steps
  rows = data_lib.process_rows(shard.batch, B)  # this process's rows of each batch
  # The parameters about to be saved are scored on one eval batch (the eval step's shapes:
  # nothing more to compile) and checked for NaN: a diverged state is never saved.
  probe = data_lib.put(next(data_lib.eval_batches(eval_tokens, T, config.eval_batch_size, 1)),
                       shard.batch)
  lr = runs.make_lr_schedule(config)
  warmup_last = (activation.setting(config.activation, 'full_warmup_steps')
                 if warmup_end is not None else None)
  speed = Throughput(B * T)
  pending, last = [], {}
  for step in range(resume + 1, N + 1):
    batch = data_lib.put(data_lib.train_batch(train_tokens, B, T, config.seed, step - 1, rows),
                         shard.batch, B)
    profiler.before(step)
    state, metrics = train_step(state, batch, train_key)
    if step == warmup_last:
      state = warmup_end(state)
    profiler.after(step, metrics)
    pending.append(metrics)
    bar.update(1)
    speed.start(state, step)
    stop = signals.requested(step)
    eval_now = itstime(step, config.eval_every, N)
    save_now = itstime(step, config.checkpoint_every, N) or stop
    if not (itstime(step, config.log_every, N) or eval_now or save_now):
      continue
    last, pending = _mean_metrics(pending), []
    if not math.isfinite(last['train_loss']):
      mngr.wait_until_finished()
      raise FloatingPointError(
          f'train loss is {last["train_loss"]} at step {step}; stopping without saving it. '
          f'{_newest(mngr, workdir)} Lower config.opt.learning_rate (resuming with '
          '--allow_config_change) or check the data.')
    last.update(learning_rate=float(lr(step - 1)), **speed.rate(step))
    if eval_now:
      last['eval_loss'], _ = evaluate_lib.mean_loss(eval_step, state.params, eval_tokens,
                                                    config, shard.batch)
    log.write(step, last)
    bar.set_postfix({k: f'{last[k]:.4g}' for k in ('train_loss', 'eval_loss',
                                                   'tokens_per_sec') if k in last})
    if save_now:
      _save(step, state, eval_step, probe, mngr, workdir)
    if stop:  # `finally` waits for the save before the exception leaves
      name = signal.Signals(signals.signum).name
      raise Interrupted(
          f'stopped by {name} after step {step}; saved the checkpoint of step {step} in '
          f'{workdir}. Run the same command to resume.', signals.signum, step)
    speed.restart(step)
  return last


def _save(step, state, eval_step, probe, mngr, workdir) -> None:
  """Saves the state unless its parameters are not finite or score a non-finite loss."""
  total, count = eval_step(state.params, *probe, jax.random.key(0))
  loss = float(total) / float(count)
  finite = bool(runs.all_finite(state.params))
  if not (finite and math.isfinite(loss)):
    mngr.wait_until_finished()
    raise FloatingPointError(
        f'the parameters after step {step} give an eval loss of {loss}'
        f'{"" if finite else " and hold NaN or infinite values"}; stopping without saving '
        f'them. {_newest(mngr, workdir)} Resume from it with a lower '
        'config.opt.learning_rate and --allow_config_change, or start a new --workdir.')
  mngr.wait_until_finished()  # (orbax waits for the save in flight before a new one anyway)
  workdir_lib.seal_checkpoints(workdir)
  mngr.save(step, args=ocp.args.StandardSave(state))


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
  flags.DEFINE_bool('allow_config_change', False,
                    'Resume although the config differs from the workdir\'s in the model\'s '
                    'training (activation, optimizer, data, seed); both configs are kept.')
  flags.DEFINE_bool('distributed', None,
                    'Call jax.distributed.initialize() (multi-process runs). Default: when '
                    'JAX_COORDINATOR_ADDRESS is set; pass it on TPU pod slices.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  workdir_lib.quiet_logs()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  distributed = flags.FLAGS.distributed
  sharding.set_cpu_devices(flags.FLAGS.config, distributed=bool(
      distributed or (distributed is None and 'JAX_COORDINATOR_ADDRESS' in os.environ)))
  initialize_distributed(distributed)
  try:
    last = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                              flags.FLAGS.allow_config_change, cli.config_overrides(sys.argv))
  except Interrupted as e:
    print(f'rag_jax: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  if last:
    print(summary(last, flags.FLAGS.config.num_steps, flags.FLAGS.workdir))


def summary(last: dict, step: int, workdir: str) -> str:
  """The end of a run in one line: its losses and speed, and where it is."""
  parts = [f"train loss {last['train_loss']:.4f}"]
  if 'eval_loss' in last:
    parts.append(f"eval loss {last['eval_loss']:.4f}")
  if 'tokens_per_sec' in last:
    parts.append(f"{last['tokens_per_sec']:,.0f} tokens/s")
  return f"step {step}: {', '.join(parts)}; the run is in {workdir}"


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
