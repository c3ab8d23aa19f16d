"""Two processes on this machine (2 CPU devices each, over loopback) train like one process:
jax.distributed from the JAX_* environment, each process feeding its own rows of the batch,
metrics written once, one orbax checkpoint of the sharded state."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rag_jax import runs
from rag_jax import train
from rag_jax import workdir as workdir_lib
from tests.conftest import ROOT, load_config

OVERRIDES = dict(num_steps=20, checkpoint_every=10, eval_every=10, log_every=5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_two(cmd, env):
  """`cmd` as the two processes (2 CPU devices each) of one run, over loopback."""
  port = _free_port()
  return [subprocess.Popen(
      cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2',
           'JAX_PROCESS_ID': str(i)}) for i in range(2)]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_agree_with_one(tfds_dir, tfds_env, tmp_path):
  two = str(tmp_path / 'two')
  cmd = [sys.executable, '-m', 'rag_jax.train', '--config=configs/ra_shakespeare_char.py:smoke',
         f'--workdir={two}', f'--config.data.data_dir={tfds_dir}', '--config.mesh.data=2',
         '--config.mesh.fsdp=2'] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  procs = _start_two(cmd, tfds_env)
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]

  config = load_config('ra_shakespeare_char', 'smoke')
  config.update(OVERRIDES)
  config.data.data_dir = tfds_dir
  config.mesh.data = 1
  one = str(tmp_path / 'one')
  train.train_and_evaluate(config, one)

  a, b = _metrics(one), _metrics(two)
  assert [r['step'] for r in b] == [r['step'] for r in a] == [5, 10, 15, 20]  # written once
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(rb['train_loss'], ra['train_loss'], rtol=2e-4)
    assert ra['active_mlp'] == rb['active_mlp']  # the same draws
  np.testing.assert_allclose(b[-1]['eval_loss'], a[-1]['eval_loss'], rtol=2e-4)
  assert len([n for n in os.listdir(two) if n.startswith('events.out.tfevents')]) == 1
  # The checkpoint the two processes wrote together restores onto this one device.
  _, _, _, params_two, step = runs.load_run(two)
  _, _, _, params_one, _ = runs.load_run(one)
  assert step == 20
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), params_two, params_one)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_all(tfds_dir, tfds_env, tmp_path):
  """Preemption of a multi-process run: SIGTERM reaches one process; JAX's preemption service
  tells the others, all save the same step (orbax's reached_preemption) and exit 143."""
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'rag_jax.train', '--config=configs/shakespeare_char.py:smoke',
         f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}', '--config.mesh.data=4',
         '--config.num_steps=1000', '--config.log_every=1']
  procs = _start_two(cmd, tfds_env)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  try:
    start = time.time()
    while not (os.path.exists(metrics) and len(_metrics(workdir)) >= 3):
      assert all(p.poll() is None for p in procs) and time.time() - start < 240
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  step = workdir_lib.latest_step(workdir)
  assert 3 <= step < 1000
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 143, err[-3000:]
    assert f'stopped by SIGTERM after step {step}; saved the checkpoint of step {step}' in err
  assert _metrics(workdir)[-1]['step'] == step
  assert runs.load_run(workdir).step == step
