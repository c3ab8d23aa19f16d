"""Meshes and precision: data, fsdp, data x fsdp (x tensor) meshes of 8 simulated CPU devices
train like one device, dense and with random activation; a checkpoint saved on one mesh resumes
on another and loads onto one device; bfloat16 training falls in loss like float32."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rag_jax import evaluate
from rag_jax import runs
from rag_jax import sharding
from rag_jax import train
from tests.conftest import ROOT, load_config

EIGHT = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


def _worker(env, *args):
  proc = subprocess.run([sys.executable, '-m', 'tests.mesh_worker', *args], cwd=ROOT,
                        env={**env, **EIGHT}, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rules_map_logical_axes_to_mesh_axes():
  config = load_config('shakespeare_char', 'smoke')
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  spec = lambda axes, shape: sharding.partition_spec(axes, shape, config.mesh.rules, mesh)
  P = jax.sharding.PartitionSpec
  assert spec(('embed', 'mlp'), (32, 128)) == P('fsdp', 'tensor')
  assert spec(('vocab', 'embed'), (65, 32)) == P(None, 'fsdp')  # 65 does not split in two
  assert (spec(('embed', None, 'heads', 'head_dim'), (32, 2, 4, 8))
          == P('fsdp', None, 'tensor', None))
  assert spec(None, (3,)) == P()
  # A mesh axis serves one dimension; size-1 axes are dropped.
  assert sharding.partition_spec(('embed', 'mlp'), (32, 128), {'embed': 'fsdp', 'mlp': 'fsdp'},
                               mesh) == P('fsdp', None)
  assert sharding.partition_spec(('embed',), (32,), {'embed': 'data,fsdp'},
                              jax.sharding.AbstractMesh((1, 4, 1), sharding.MESH_AXES)) == P('fsdp')


def test_every_parameter_has_logical_axes():
  config = load_config('shakespeare_char', 'smoke')
  config.model.use_bias = True
  model, tx = runs.make_model(config, 65), runs.make_optimizer(config)
  state = jax.eval_shape(lambda k: runs.init_state(model, tx, k, config), jax.random.key(0))
  missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
             if sharding.param_axes(p, x.ndim) is None]
  assert not missing
  # Adam's moments get their parameter's axes; the step counters none.
  axes = [sharding.param_axes(p, x.ndim)
          for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert any(a == ('embed', 'mlp') for a in axes) and None in axes


@pytest.mark.slow
def test_meshes_give_the_losses_of_one_device(tfds_env):
  meshes = {'one': {'data': 1}, 'data': {'data': 8}, 'fsdp': {'fsdp': 8},
            'data_fsdp_tensor': {'data': 2, 'fsdp': 2, 'tensor': 2}}
  result = _worker(tfds_env, 'losses', json.dumps(meshes))
  for model in ('dense', 'ra'):
    one = result['one'][model]
    assert one['devices'] == 1 and one['split_params'] == 0
    for name in meshes:
      run = result[name][model]
      assert run['devices'] == (1 if name == 'one' else 8)
      if 'fsdp' in name:  # every matrix and LayerNorm is split; the 65-row wte over fsdp too.
        assert run['split_params'] == 17, (name, run)
      np.testing.assert_allclose(run['losses'], one['losses'], rtol=2e-5, err_msg=f'{name} {model}')
  # The random activation trained a sub-network: its losses are not the dense model's.
  assert result['one']['ra']['losses'] != result['one']['dense']['losses']


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(tfds_env, tfds_dir, tmp_path):
  """Saved on fsdp=8, resumed on data x fsdp x tensor = 2x2x2, loaded onto one device."""
  result = _worker(tfds_env, 'restore', tfds_dir, str(tmp_path))
  first, resumed = result['fsdp'], result['resumed']
  assert [r['step'] for r in first] == [r['step'] for r in resumed] == [5, 10, 15, 20]
  for a, b in zip(first, resumed):
    np.testing.assert_allclose(b['train_loss'], a['train_loss'], rtol=2e-5)
  np.testing.assert_allclose(resumed[-1]['eval_loss'], first[-1]['eval_loss'], rtol=2e-5)
  # runs.load_run restores the mesh-split checkpoint onto this process's one device.
  _, _, _, params, step = runs.load_run(str(tmp_path / 'resumed'))
  assert step == 20 and all(len(x.devices()) == 1 for x in jax.tree.leaves(params))
  entry = evaluate.evaluate(str(tmp_path / 'resumed'), (1.0,))[0]
  np.testing.assert_allclose(entry['loss'], resumed[-1]['eval_loss'], rtol=1e-4)


@pytest.mark.slow
def test_bfloat16_loss_falls_like_float32(smoke_config, tmp_path):
  smoke_config.num_steps = 40
  smoke_config.eval_every = 20
  finals = {}
  for dtype in ('float32', 'bfloat16'):
    config = smoke_config.copy_and_resolve_references()
    config.dtype = dtype
    last = train.train_and_evaluate(config, str(tmp_path / dtype))
    with open(tmp_path / dtype / 'metrics.jsonl') as f:
      rows = [json.loads(line) for line in f]
    assert rows[0]['train_loss'] > rows[-1]['train_loss'] + 0.5, (dtype, rows)
    finals[dtype] = last['eval_loss']
  assert abs(finals['bfloat16'] - finals['float32']) < 0.05, finals


@pytest.mark.slow
def test_bfloat16_keeps_float32_params_and_logits():
  config = load_config('shakespeare_char', 'smoke')
  config.dtype = 'bfloat16'
  model = runs.make_model(config, 65)
  tokens = np.zeros((2, config.model.block_size), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}
  forward = jax.jit(lambda p: model.apply({'params': p}, tokens)[0])
  assert forward.eval_shape(params).dtype == np.float32
  assert 'bf16' in forward.lower(params).as_text()  # the matmuls run in bfloat16
  from rag_jax.models import gpt
  assert gpt.init_cache(model.cfg, 1)[0]['k'].dtype == jax.numpy.bfloat16


def test_cpu_device_count_divides_the_batches():
  config = load_config('shakespeare_char', '')  # batch 12, eval batch 128
  assert config.mesh.cpu_devices == 0
  assert [sharding.cpu_device_count(config, cores=c) for c in (1, 2, 3, 8, 64)] == [1, 2, 2, 4, 4]
  config.mesh.cpu_devices = 3  # explicit: taken as given (make_mesh checks the batches)
  assert sharding.cpu_device_count(config, cores=64) == 3


def _devices_after_set_cpu_devices(env, cpu_devices):
  code = ('import jax, os, sys; from rag_jax import sharding; '
          'from tests.conftest import load_config;'
          'c = load_config("shakespeare_char", ""); c.mesh.cpu_devices = int(sys.argv[1]);'
          'print(sharding.set_cpu_devices(c), len(jax.devices()), sharding.cpu_device_count(c),'
          '      sharding.CPU_COLLECTIVE_TIMEOUT + "=3600" in os.environ.get("XLA_FLAGS", ""))')
  proc = subprocess.run([sys.executable, '-c', code, str(cpu_devices)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.split()


@pytest.mark.slow
def test_set_cpu_devices_before_jax_starts_and_not_over_xla_flags():
  """`python -m rag_jax.train` on a CPU host: one JAX device per core (as many as divide the
  batches), so the data axis splits a step over the cores; XLA_FLAGS naming a device count, or
  backends already started, are left alone."""
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}
  set_to, devices, auto, _ = _devices_after_set_cpu_devices(env, 0)
  assert set_to == auto == devices
  # Several devices wait for each other in every step's all-reduce: XLA's 40 s abort is raised
  # to an hour (a busy core starves a device; it is not stuck). The backend started with the
  # flag, so XLA knows it (an unknown flag aborts at start).
  assert _devices_after_set_cpu_devices(env, 3) == ['3', '3', '3', 'True']
  assert _devices_after_set_cpu_devices(env, 1) == ['1', '1', '1', 'False']
  assert _devices_after_set_cpu_devices({**env, **EIGHT}, 3)[:2] == ['None', '8']
  jax.devices()  # this process's backends are up: nothing changes
  assert sharding.set_cpu_devices(load_config('shakespeare_char', '')) is None
