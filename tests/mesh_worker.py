"""The multi-device halves of tests/test_sharding.py, run in a subprocess with 8 CPU devices
(the pytest process has one):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.mesh_worker losses \
        '{"data": {"data": 8}, "fsdp": {"data": 1, "fsdp": 8}}'
    ... python -m tests.mesh_worker restore DATA_DIR WORKDIR

`losses`: on each mesh, a few train steps of the dense and the random-activation :smoke models
from the same initial parameters on the same batches, with the production pieces
(sharding.make_mesh, Shardings, jit_train_step); reports the losses and how many parameter arrays
the mesh really splits. `restore`: trains on an fsdp mesh, then resumes its first checkpoint
on a data x fsdp x tensor mesh. Both print one JSON object.
"""
import json
import os
import shutil
import sys

import jax
import numpy as np

from rag_jax.data import pipeline as data_lib
from rag_jax import runs
from rag_jax import sharding
from rag_jax import train
from tests.conftest import load_config

STEPS = 4
VOCAB = 65


def set_mesh(config, **sizes):
  config.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, **sizes})
  return config


def initial_state(config):
  """One initial state for every mesh (compiling a sharded init per mesh is slower on CPU than
  the training steps; train_and_evaluate's sharded init runs in `restore`)."""
  model, tx = runs.make_model(config, VOCAB), runs.make_optimizer(config)
  return jax.device_get(
      jax.jit(lambda key: runs.init_state(model, tx, key, config))(jax.random.key(0)))


def losses(config, mesh_sizes: dict, state) -> dict:
  """`state`: numpy arrays, placed afresh (the step donates its input)."""
  mesh = sharding.make_mesh(set_mesh(config, **mesh_sizes))
  model, tx = runs.make_model(config, VOCAB), runs.make_optimizer(config)
  shard = sharding.Shardings.of(mesh, state, config.mesh.rules)
  state = jax.device_put(state, shard.state)
  split = [x for x in jax.tree.leaves(state.params)
           if x.addressable_shards[0].data.shape != x.shape]
  step = train.jit_train_step(model, tx, config, shard)
  tokens = np.random.default_rng(0).integers(0, VOCAB, 5000).astype(np.int32)
  out = []
  with jax.set_mesh(mesh):
    for i in range(STEPS):
      batch = data_lib.put(data_lib.train_batch(tokens, config.batch_size,
                                                config.model.block_size, 0, i), shard.batch)
      state, metrics = step(state, batch, jax.random.key(1))
      out.append(float(metrics['train_loss']))
  return {'losses': out, 'split_params': len(split), 'devices': mesh.size}


def restore(data_dir: str, workdir: str) -> dict:
  """Trains 20 steps on fsdp=8 (checkpoints at 10, 20); a copy without step 20 resumes from
  step 10 on data=2 x fsdp=2 x tensor=2. Returns both runs' metrics."""
  config = load_config('ra_shakespeare_char', 'smoke')
  config.update(num_steps=20, checkpoint_every=10, eval_every=10, log_every=5)
  config.data.data_dir = data_dir
  first = os.path.join(workdir, 'fsdp')
  train.train_and_evaluate(set_mesh(config, fsdp=8), first)
  second = os.path.join(workdir, 'resumed')
  shutil.copytree(first, second)
  shutil.rmtree(os.path.join(second, 'checkpoints', '20'))
  train.train_and_evaluate(set_mesh(config, data=2, fsdp=2, tensor=2), second)
  out = {}
  for name in ('fsdp', 'resumed'):
    with open(os.path.join(workdir, name, 'metrics.jsonl')) as f:
      out[name] = [json.loads(line) for line in f]
  return out


if __name__ == '__main__':
  if sys.argv[1] == 'losses':
    configs = {'dense': load_config('shakespeare_char', 'smoke'),
               'ra': load_config('ra_shakespeare_char', 'smoke')}
    state0 = initial_state(configs['dense'])
    print(json.dumps({name: {k: losses(c, sizes, state0) for k, c in configs.items()}
                      for name, sizes in json.loads(sys.argv[2]).items()}))
  else:
    print(json.dumps(restore(*sys.argv[2:4])))
