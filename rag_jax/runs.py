"""A run, built from its config or loaded from its workdir: the one place that makes the model.

`train`, `evaluate` and `sample` (and the benchmarks and notebooks) build the model, the
optimizer and the initial state here, and load a trained run here: its config, its tokenizer
and the parameters of its newest checkpoint, restored without the optimizer state.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rag_jax import configuration
from rag_jax import sweeps
from rag_jax import weights
from rag_jax import workdir as workdir_lib
from rag_jax.data import tokenizers
from rag_jax.errors import ConfigError
from rag_jax.errors import WorkdirError
from rag_jax.models import gpt


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> gpt.GPT:
  """The run's model, in the run's `config.dtype`."""
  return gpt.GPT(gpt.GPTConfig.from_config(config.model, vocab_size,
                                           dtype=config.get('dtype', 'float32')))


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to min_learning_rate at num_steps."""
  o = config.opt
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=config.num_steps, end_value=o.min_learning_rate)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW on make_lr_schedule, global-norm clipping; weight decay on matrices and embeddings
  only (ndim >= 2), as in nanoGPT."""
  o = config.opt
  adamw = optax.adamw(make_lr_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw


def init_params(model: gpt.GPT, key: jax.Array) -> Any:
  """Fresh parameters (traced on one window of the context length)."""
  return model.init(key, jnp.zeros((1, model.cfg.block_size), jnp.int32))['params']


def init_state(model: gpt.GPT, tx: optax.GradientTransformation, key: jax.Array,
               config: ml_collections.ConfigDict) -> TrainState:
  del config  # the model carries its shapes; the argument stays for the callers (train, benches)
  return state_from(init_params(model, key), tx)


def state_from(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state at step 0 for `params` (AdamW's moments at zero)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True when every array of `tree` (e.g. parameters) holds only finite numbers."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_finite(params: Any, workdir: str, step: int) -> None:
  """WorkdirError when the parameters loaded from `workdir` (its checkpoint of `step`, or an
  export) hold NaN or infinite values: never scored, sampled or trained on."""
  if all_finite(params):
    return
  where = (f'{workdir}/{weights.WEIGHTS_FILE}' if weights.is_export(workdir) else
           f'the checkpoint of step {step} in {workdir}')
  fix = ('export it again' if weights.is_export(workdir) else
         f'move checkpoints/{step} away to use an older step')
  raise WorkdirError(f'{where} holds NaN or infinite parameters (the run diverged before it '
                     f'was saved); {fix}. Nothing was changed.')


class Run(NamedTuple):
  """A trained run as `load_run` gives it."""
  config: ml_collections.ConfigDict
  tokenizer: tokenizers.Tokenizer
  model: gpt.GPT
  params: Any
  step: int


def load_run(workdir: str, overrides: dict[str, Any] | None = None) -> Run:
  """The newest checkpoint of `workdir` with its config and tokenizer, the parameters on this
  process's first device (orbax's partial restore reads no optimizer state); or the weights of
  a directory written by rag_jax.export. WorkdirError when a file is missing or damaged;
  nothing is written.

  `overrides` ({dotted field: value}, what `--config.FIELD=VALUE` gives the tools that read a
  workdir) change the saved config for this load: the dtype, the data to score, evaluation
  batches, activation settings. An override that changes the parameters' shapes is refused
  (ConfigError) before anything is restored."""
  config = workdir_lib.load_config(workdir)  # checks that `workdir` is a run's directory
  tokenizer = tokenizers.load(os.path.join(workdir, workdir_lib.TOKENIZER_FILE))
  model = make_model(config, tokenizer.vocab_size)
  abstract = jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
  if overrides:
    config, model = _overridden(config, overrides, tokenizer, abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if weights.is_export(workdir):  # an exported sub-model (rag_jax/export.py)
    params, step = _load_export(workdir, abstract), weights.export_step(workdir)
    params = jax.device_put(params, device)
  else:
    step = workdir_lib.latest_step(workdir)
    if step is None:
      raise WorkdirError(f'{workdir} holds no checkpoint; train it first.')
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract)
    mngr = workdir_lib.checkpoint_manager(workdir)
    try:
      params = workdir_lib.restore(mngr, step, {'params': abstract}, workdir,
                                   partial=True)['params']
    finally:
      mngr.close()
  check_finite(params, workdir, step)
  return Run(config, tokenizer, model, params, step)


def _overridden(config, overrides: dict[str, Any], tokenizer, abstract):
  """(config, model) with `overrides` applied and validated; ConfigError naming the overrides
  when the model they describe has other parameter shapes than the saved one."""
  config = sweeps.apply(config, overrides)
  configuration.validate(config)
  model = make_model(config, tokenizer.vocab_size)
  shapes = lambda tree: {k: x.shape for k, x in weights.flatten(tree).items()}
  if shapes(jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))) != shapes(
      abstract):
    fields = ', '.join(f'--config.{k}' for k in overrides if k.startswith(('model.', 'data.')))
    raise ConfigError(f'{fields or "the overrides"}: a saved run\'s parameters keep their '
                      'shapes; override fields that do not change them (dtype, data, '
                      'evaluation, activation).')
  return config, model


def _load_export(directory: str, abstract: Any) -> Any:
  """An export's parameters, checked against the shapes its config.json gives."""
  params = weights.load_params(directory)
  want = {k: x.shape for k, x in weights.flatten(abstract).items()}
  have = {k: np.shape(x) for k, x in weights.flatten(params).items()}
  if want != have:
    wrong = sorted(set(want.items()) ^ set(have.items()))[:3]
    raise WorkdirError(f'{directory}/{weights.WEIGHTS_FILE} does not hold the model its '
                       f'config.json describes (first differences: {wrong}).')
  return params


# The model fields a run started from another model's parameters (`config.init_from`) must share
# with it; block_size may be smaller (the first positions are taken).
INIT_FIELDS = ('num_layers', 'num_heads', 'embed_dim', 'mlp_dim', 'use_bias', 'head_dim', 'gelu',
               'layer_heads', 'layer_mlp_dims')


def load_init(config: ml_collections.ConfigDict) -> Run:
  """The model `config.init_from` names (a workdir's newest checkpoint, an export, or a GPT-2
  converted by rag_jax.convert), checked against the run's config before anything compiles:
  one WorkdirError listing the model fields to set, or a tokenizer of another kind."""
  source = load_run(config.init_from)
  if not weights.is_export(config.init_from) and source.step < source.config.num_steps:
    raise WorkdirError(
        f'config.init_from={config.init_from} is a run that has not finished (its newest '
        f'checkpoint is step {source.step} of {source.config.num_steps}); finish it first, or '
        'export that checkpoint and start from the export.')
  run_cfg = make_model(config, source.tokenizer.vocab_size).cfg
  src_cfg = source.model.cfg
  differ = {f: getattr(src_cfg, f) for f in INIT_FIELDS
            if getattr(src_cfg, f) != getattr(run_cfg, f)}
  if run_cfg.block_size > src_cfg.block_size:
    differ['block_size'] = src_cfg.block_size
  if differ:
    flag = lambda v: ','.join(map(str, v)) if isinstance(v, tuple) else v  # (2, 3) -> 2,3
    sets = ' '.join(f'--config.model.{k}={flag(v)}' for k, v in differ.items())
    raise WorkdirError(
        f'config.init_from={config.init_from} holds another model than the config describes '
        f'({"; ".join(f"{k} {getattr(run_cfg, k)} here, {v} there" for k, v in differ.items())}'
        f'); start from its config or set {sets} (block_size may be smaller).')
  kind = config.data.tokenizer
  if source.tokenizer.kind != kind:
    raise WorkdirError(f'config.init_from={config.init_from} reads {source.tokenizer.kind} '
                       f"tokens but config.data.tokenizer is {kind!r}; set "
                       f'--config.data.tokenizer={source.tokenizer.kind} (the run then uses '
                       'its tokenizer).')
  return source


def init_params_from(source: Run, abstract: Any) -> Any:
  """`source`'s parameters in the shapes and shardings of `abstract` (the run's parameters):
  positions beyond the run's block_size dropped, every process placing its own shards."""

  def place(x, a):
    x = np.asarray(x, np.float32)[tuple(slice(0, n) for n in a.shape)]
    assert x.shape == a.shape, (x.shape, a.shape)
    return jax.make_array_from_callback(a.shape, a.sharding, lambda index: x[index])

  return jax.tree.map(place, jax.device_get(source.params), abstract)
