"""Model weights as safetensors: the exported sub-models' format (rag_jax/export.py).

Parameters are stored flat, named by their path ('block_0/attn/query'). With int8, each matrix
is stored as 'NAME:int8' with a float32 scale per output channel 'NAME:scale' (symmetric,
weight-only: dequantized to float32 when loaded, so the compute is float32 and only the bytes on
disk shrink), the vectors (LayerNorm, biases) as float32.
"""
from __future__ import annotations

import os

from flax import traverse_util
import numpy as np
import safetensors.numpy

from rag_jax import files
from rag_jax.errors import WorkdirError

WEIGHTS_FILE = 'model.safetensors'
EXPORT_FILE = 'export.json'
# The axes a matrix sums over in its product (int8 scales are per the remaining, output axes).
# The embedding is read by rows and, tied, gives one logit per row: a scale per row.
INPUT_AXES = {'query': (0,), 'key_value': (0,), 'out': (0, 1), 'w_in': (0,), 'w_out': (0,),
              'wte': (1,), 'wpe': (1,)}


def flatten(params) -> dict:
  """{'block_0/attn/query': leaf, ...}: the names parameters are stored under."""
  return traverse_util.flatten_dict(params, sep='/')


def quantize(w: np.ndarray, input_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 with one float32 scale per output channel: w ≈ q * scale, |error| <= scale/2."""
  w = np.asarray(w, np.float32)
  scale = np.max(np.abs(w), axis=input_axes, keepdims=True) / 127.0
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return q, scale


def to_tensors(params: dict, int8: bool = False) -> dict[str, np.ndarray]:
  """The safetensors entries of `params`; with `int8`, matrices as 'NAME:int8' + 'NAME:scale'."""
  tensors = {}
  for name, w in flatten(params).items():
    leaf = name.split('/')[-1]
    if int8 and leaf in INPUT_AXES:
      tensors[f'{name}:int8'], tensors[f'{name}:scale'] = quantize(w, INPUT_AXES[leaf])
    else:
      tensors[name] = np.asarray(w, np.float32)
  # safetensors writes an array's memory as it lies: a sliced (non C-contiguous) array would be
  # stored scrambled.
  return {name: np.ascontiguousarray(x) for name, x in tensors.items()}


def from_tensors(tensors: dict[str, np.ndarray]) -> dict:
  """Parameters (float32) from safetensors entries, int8 ones dequantized."""
  flat = {}
  for name, value in tensors.items():
    if name.endswith(':scale'):
      continue
    if name.endswith(':int8'):
      base = name[:-len(':int8')]
      flat[base] = value.astype(np.float32) * tensors[f'{base}:scale']
    else:
      flat[name] = value
  return traverse_util.unflatten_dict(flat, sep='/')


def is_export(path: str) -> bool:
  return files.isfile(os.path.join(path, EXPORT_FILE))


def export_step(path: str) -> int:
  """The parent's step an export was taken at."""
  try:
    return int(files.read_json(os.path.join(path, EXPORT_FILE))['step'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WorkdirError(f'{os.path.join(path, EXPORT_FILE)} is damaged ({e}).') from None


def load_params(path: str) -> dict:
  """The parameters of an exported directory."""
  weights = os.path.join(path, WEIGHTS_FILE)
  try:
    return from_tensors(read_tensors(weights))
  except FileNotFoundError:
    raise WorkdirError(f'{weights} does not exist; {path} is not a complete export.') from None
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own errors)
    raise WorkdirError(f'{weights} cannot be read ({type(e).__name__}: {e}).') from None


def save(params: dict, directory: str, int8: bool = False) -> str:
  """Writes DIR/model.safetensors (atomically); returns its path."""
  path = os.path.join(directory, WEIGHTS_FILE)
  write_tensors(path, to_tensors(params, int8), {'format': 'rag_jax', 'int8': str(bool(int8))})
  return path


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file's arrays: memory-mapped from a local file, else read through epath."""
  if files.is_local(path):
    return safetensors.numpy.load_file(files.local(path))
  return safetensors.numpy.load(files.path(path).read_bytes())


def write_tensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  files.write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))
