"""Sharding: the device mesh, the parameters' logical axes and how they map onto the mesh.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by `config.mesh`. A batch is split
over (`data`, `fsdp`): FSDP is data parallelism too. Every parameter has logical axis names
(`PARAM_AXES`); `config.mesh.rules` maps a logical name to mesh axes ('fsdp', 'data,fsdp', ''
for none), and Flax's `logical_to_mesh_axes` turns a parameter's names into its PartitionSpec.
Adam's moments mirror the parameters' tree and get the same shardings. docs/scaling.md has the
recipes (one GPU, Colab, a TPU pod slice).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent in jax 0.10
import ml_collections

from rag_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axis names of every parameter, by name (LayerNorm's are `scale` and `bias`); None is
# an axis that is never split.
PARAM_AXES = {
    'wte': ('vocab', 'embed'), 'wpe': ('position', 'embed'),
    'query': ('embed', 'heads', 'head_dim'), 'query_bias': ('heads', 'head_dim'),
    'key_value': ('embed', None, 'heads', 'head_dim'),
    'key_value_bias': (None, 'heads', 'head_dim'),
    'out': ('heads', 'head_dim', 'embed'), 'out_bias': ('embed',),
    'w_in': ('embed', 'mlp'), 'b_in': ('mlp',), 'w_out': ('mlp', 'embed'), 'b_out': ('embed',),
    'scale': ('embed',), 'bias': ('embed',),
}


def param_axes(path, ndim: int) -> tuple[str | None, ...] | None:
  """The logical axes of a leaf at `path` (a jax.tree_util key path into params, or into an
  optimizer state mirroring them); None for leaves that are not parameters (step counters)."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  axes = PARAM_AXES.get(names[-1]) if names else None
  return axes if axes is not None and len(axes) == ndim else None


def shard_batch(x_BxLxD: jax.Array) -> jax.Array:
  """`x` split by batch over the (data, fsdp) axes of the mesh in context (`jax.set_mesh`, as
  train.py sets it); unchanged without one. Between blocks this keeps XLA from re-splitting
  activations along the model width to match FSDP-split weights: it gathers the weights instead
  (ZeRO-3), and the collectives stay the size of the weights, not of the activations."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x_BxLxD.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x_BxLxD
  return jax.lax.with_sharding_constraint(x_BxLxD, jax.sharding.PartitionSpec(axes))


CPU_COLLECTIVE_TIMEOUT = 'xla_cpu_collective_call_terminate_timeout_seconds'


def cpu_device_count(config: ml_collections.ConfigDict, cores: int | None = None) -> int:
  """The JAX CPU devices `config.mesh.cpu_devices` asks for: itself when positive; 0 (auto) is
  one per core, lowered to the largest count that divides the train and eval batches (so a
  CPU-only host splits each step over its cores by data parallelism, as the `data` axis splits
  it over GPUs)."""
  want = config.mesh.get('cpu_devices', 0)
  if want:
    return want
  if not cores:  # the cores this process may run on (macOS has no sched_getaffinity)
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
             else os.cpu_count() or 1)
  return max(n for n in range(1, cores + 1)
             if config.batch_size % n == 0 and config.eval_batch_size % n == 0)


def set_cpu_devices(config: ml_collections.ConfigDict, distributed: bool = False) -> int | None:
  """Gives JAX's CPU backend `cpu_device_count(config)` devices; called by the command-line
  programs before JAX starts. It leaves alone what JAX would otherwise do where that is already
  decided: XLA_FLAGS naming a device count, backends already started (in a notebook, set
  `jax.config.update('jax_num_cpu_devices', n)` before the first computation), or a multi-process
  run. Harmless on a GPU or TPU host, whose computations do not run on the CPU devices. Returns
  the count set, or None."""
  if (distributed or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or xla_bridge.backends_are_initialized()):
    return None
  n = cpu_device_count(config)
  jax.config.update('jax_num_cpu_devices', n)
  flags = os.environ.get('XLA_FLAGS', '')
  if n > 1 and CPU_COLLECTIVE_TIMEOUT not in flags:
    # The CPU devices meet in every step's all-reduce; XLA aborts the process when one of them
    # waits 40 s for the others, which a core shared with other work (a second run, a test
    # suite) can cause. Starved is not stuck: wait an hour instead.
    os.environ['XLA_FLAGS'] = f'{flags} --{CPU_COLLECTIVE_TIMEOUT}=3600'.strip()
  return n


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of the MESH_AXES from `config.mesh` (-1: the devices the others leave; a missing
  axis is 1). Their product may be below `num_devices` (then the first devices are used)."""
  sizes = [config.mesh.get(a, 1) for a in MESH_AXES]  # checked by configuration.validate
  fixed = math.prod(n for n in sizes if n != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
          f'config.mesh: {num_devices} device(s) do not split into the fixed axis sizes '
          f'(product {fixed}); set the sizes explicitly.')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) > num_devices:
    name = 'config.mesh.data' if sizes[1:] == [1, 1] else 'config.mesh'
    value = sizes[0] if sizes[1:] == [1, 1] else dict(zip(MESH_AXES, sizes))
    raise ConfigError(f'{name}={value} but only {num_devices} device(s) are visible.')
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh`, with Auto (propagated) sharding axes."""
  devices = jax.devices()
  shape = mesh_shape(config, len(devices))
  n, batch_ways = math.prod(shape), shape[0] * shape[1]
  if n < len(devices) and jax.process_count() > 1:
    raise ConfigError(
        f'config.mesh uses {n} of {len(devices)} devices; a multi-process run must use all.')
  if config.batch_size % batch_ways or config.eval_batch_size % batch_ways:
    raise ConfigError(
        f'config.batch_size ({config.batch_size}) and config.eval_batch_size '
        f'({config.eval_batch_size}) must be divisible by the {batch_ways} device(s) on the '
        'data and fsdp axes; change them or set config.mesh.')
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices[:n])


def partition_spec(axes, shape, rules, mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """PartitionSpec of an array with logical `axes` (None: not a parameter, replicated).

  `rules` maps a logical name to mesh axes ('fsdp', 'data,fsdp', '' for none). Mesh axes of
  size 1 are dropped, and a dimension its mesh axes do not divide stays whole (e.g. a
  65-character vocabulary); then Flax's `logical_to_mesh_axes` assigns them, a mesh axis
  serving one dimension only: the first that asks for it.
  """
  if axes is None:
    return jax.sharding.PartitionSpec()
  pairs = []
  for name, size in zip(axes, shape):
    mesh_axes = tuple(a for a in str(rules.get(name, '') if name else '').split(',')
                      if a and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      pairs.append((name, mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
  return nn.logical_to_mesh_axes(axes, pairs)


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Parameters and optimizer state split by their logical axes, mapped to mesh axes by `rules`
  (config.mesh.rules; None replicates them); batches split on (`data`, `fsdp`)."""
  state: Any
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding

  @classmethod
  def of(cls, mesh: jax.sharding.Mesh, abstract_state: Any, rules=None) -> 'Shardings':
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def leaf(path, x):
      if rules is None or not hasattr(x, 'shape'):
        return replicated
      spec = partition_spec(param_axes(path, len(x.shape)), x.shape, rules, mesh)
      return jax.sharding.NamedSharding(mesh, spec)

    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return cls(state=jax.tree_util.tree_map_with_path(leaf, abstract_state),
               batch=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes)),
               replicated=replicated)
