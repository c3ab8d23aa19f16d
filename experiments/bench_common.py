"""Helpers shared by the benchmark scripts: statistics, XLA cost analysis, the environment."""
from __future__ import annotations

import os
import platform
import resource
import time

import jax
import numpy as np

from rag_jax import configuration

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


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_config(path_with_arg: str):
  """configs/NAME.py[:ARG], relative to the repository root -> ConfigDict."""
  return configuration.load_config(os.path.join(ROOT, path_with_arg))
