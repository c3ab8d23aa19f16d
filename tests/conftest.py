"""Shared fixtures: tiny_shakespeare built offline into a temporary TFDS data_dir, smoke configs."""
import os
import pathlib

import jax
import pytest

from rag_jax import configuration

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The corpus the package ships: the tests need nothing outside the repository.
SHAKESPEARE_TXT = ROOT / 'rag_jax' / 'data' / 'corpora' / 'tiny_shakespeare.txt'


def load_config(name: str, arg: str | None = None):
  """get_config(arg) of configs/<name>.py."""
  return configuration.load_config(str(ROOT / 'configs' / f'{name}.py'), arg)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir holding tiny_shakespeare, built from the bundled copy (no download)."""
  import ml_collections
  from rag_jax.data import pipeline as data
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.prepare(ml_collections.ConfigDict({'data': {'dataset': 'tiny_shakespeare', 'paths': '',
                                                   'data_dir': data_dir}}))
  return data_dir


@pytest.fixture
def smoke_config(tfds_dir):
  config = load_config('shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  return config


@pytest.fixture(scope='session')
def tfds_env(tfds_dir):
  """Environment for CLI subprocesses: the prepared data and a quiet TensorFlow."""
  # One CPU device unless a test asks for more: pytest's workers already use every core, and
  # `train`'s default (one device per core) would only oversubscribe them. That default has its
  # own test (test_sharding.py).
  return {'XLA_FLAGS': '--xla_force_host_platform_device_count=1', **os.environ,
          'TFDS_DATA_DIR': tfds_dir, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if anything is compiled: `jax.jit` refuses to wrap, and XLA compiling any
  program (a module-level jitted function, an eager op of a new shape) fails the test at its
  end, through JAX's compile-time events."""
  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the input was checked')
  monkeypatch.setattr(jax, 'jit', refuse)
  compiled = []

  def listen(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  yield
  jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiled, f'{len(compiled)} program(s) compiled before the input was checked'


def snapshot(directory) -> dict[str, bytes]:
  """Every file under `directory` (relative path -> bytes), but train.lock: who held the lock
  last is not saved work."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if name != 'train.lock':
        with open(os.path.join(root, name), 'rb') as f:
          out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out
