"""Where a train step's device time goes: a `jax.profiler` trace, summed per kernel and per op.

    python experiments/profile_step.py --out=results/profile_step_cpu.json \
        [--config=configs/gpt2_small.py] [--batch_size=B --block_size=T --dtype=D] \
        [--steps=5] [--fraction=0.5] [--trace_dir=DIR] [--hlo_dir=DIR]

The dense step (and, with `--fraction` > 0, the RA step pinned at that fraction, as
experiments/bench_mfu.py pins it) is built as `rag_jax.train` builds it, warmed up, then `--steps`
steps are traced with `jax.profiler.trace`. The trace (XSpace protobuf, under `--trace_dir`) is
read back with `jax.profiler.ProfileData` and summed, per device plane and per line (GPU: the
"XLA Ops" line holds HLO ops, the stream lines hold kernels), into the time of each event name
per step; the JSON keeps the `--top` names of each line and a coarse split of the kernels into
matrix products, attention, and the rest (elementwise fusions, reductions, copies). On a CPU the
defaults shrink the run as bench_mfu's do (batch 2, context 256, float32).
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import time

from absl import app, flags
import jax
import ml_collections

import bench_common

from rag_jax import cli
from rag_jax import activation
from rag_jax import files
from rag_jax import workdir as workdir_lib

_CONFIG = flags.DEFINE_string('config', 'configs/gpt2_small.py', 'Config (dense; RA is derived).')
_BATCH, _BLOCK, _DTYPE = bench_common.define_shape_flags()
_STEPS = flags.DEFINE_integer('steps', 5, 'Traced steps per program.')
_FRACTION = flags.DEFINE_float('fraction', 0.5, 'RA step pinned at this fraction; 0: dense only.')
_TOP = flags.DEFINE_integer('top', 40, 'Event names kept per line.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '/tmp/rag_jax_profile', 'Where traces go.')
_HLO_DIR = flags.DEFINE_string('hlo_dir', None, 'If set: each program\'s optimised HLO goes to '
                               'DIR/NAME.hlo.txt (to look up the fusions the trace names).')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)

VOCAB = 256

# Kernel names -> a coarse class (cuBLAS/cuDNN/Triton/XLA kernel names; CPU ops by HLO name).
CLASSES = (
    ('attention', re.compile(r'flash|fmha|attention|cudnn.*(fprop|bprop|dgrad)|sdpa', re.I)),
    ('matmul', re.compile(r'gemm|cutlass|sm90_xmma|xmma|cublas|dot|matmul|wgmma|nvjet|triton_gemm',
                          re.I)),
    ('copy/transpose', re.compile(r'copy|transpose|memcpy|memset', re.I)),
    ('reduction', re.compile(r'reduce|reduction', re.I)),
)


def kernel_class(name: str) -> str:
  for cls, pattern in CLASSES:
    if pattern.search(name):
      return cls
  return 'elementwise/other fusion'


def summarize(xplane_path: str, steps: int, top: int) -> dict:
  """Per device plane, per line: total ms per step and the top event names by time."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  planes = {}
  for plane in data.planes:
    if not (plane.name.startswith('/device:') or plane.name.startswith('/host:CPU')):
      continue
    lines = {}
    for line in plane.lines:
      per_name = collections.defaultdict(float)
      count = collections.Counter()
      for event in line.events:
        per_name[event.name] += event.duration_ns
        count[event.name] += 1
      if not per_name:
        continue
      total = sum(per_name.values())
      ranked = sorted(per_name.items(), key=lambda kv: -kv[1])
      entry = {'ms_per_step': total / 1e6 / steps, 'events_per_step': sum(count.values()) / steps,
               'top': [{'name': n[:160], 'ms_per_step': t / 1e6 / steps,
                        'calls_per_step': count[n] / steps, 'share': t / total}
                       for n, t in ranked[:top]]}
      classes = collections.defaultdict(float)
      for n, t in per_name.items():
        classes[kernel_class(n)] += t / 1e6 / steps
      entry['classes_ms_per_step'] = dict(sorted(classes.items(), key=lambda kv: -kv[1]))
      lines[line.name] = entry
    if lines:
      planes[plane.name] = lines
  return planes


def trace(step: bench_common.TrainStep, name: str, steps: int) -> tuple[dict, float]:
  log_dir = os.path.join(_TRACE_DIR.value, name)
  with jax.profiler.trace(log_dir):
    t0 = time.perf_counter()
    step.run(steps, record=False)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
  found = sorted(glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', '*.xplane.pb')),
                 key=os.path.getmtime)
  if not found:
    raise SystemExit(f'error: no trace written under {log_dir}')
  return summarize(found[-1], steps, _TOP.value), wall_ms


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  config = bench_common.dense_byte_config(_CONFIG.value, _BATCH.value, _BLOCK.value, _DTYPE.value)
  config.eval_batch_size = config.batch_size

  programs = {'dense': config}
  if _FRACTION.value:
    ra_config = ml_collections.ConfigDict(config.to_dict())
    ra_config.activation = bench_common.pinned(config.activation, _FRACTION.value,
                                                config.model.num_heads)
    activation.validate(ra_config.activation, ra_config.model)
    programs[f'ra_{_FRACTION.value}'] = ra_config
  result = {'config': _CONFIG.value, 'model': dict(config.model), 'batch_size': config.batch_size,
            'dtype': config.dtype, 'steps': _STEPS.value, **bench_common.environment(),
            'programs': {}}
  for name, cfg in programs.items():
    step = bench_common.TrainStep(cfg, VOCAB)
    step.run(2, record=False)
    planes, wall_ms = trace(step, name, _STEPS.value)
    step.ms = []
    step.run(_STEPS.value)  # untraced, to see what the profiler costs
    step.run_pipelined(_STEPS.value)  # and as the training loop dispatches steps
    result['programs'][name] = {'compile_s': step.compile_s, 'traced_wall_ms_per_step': wall_ms,
                                'untraced_step_ms': bench_common.stats(step.ms),
                                'untraced_pipelined_ms_per_step': step.pipelined_ms[0],
                                'planes': planes}
    if _HLO_DIR.value:
      os.makedirs(_HLO_DIR.value, exist_ok=True)
      with open(os.path.join(_HLO_DIR.value, f'{name}.hlo.txt'), 'w') as f:
        f.write(step.compiled.as_text())
    del step
    for plane, lines in planes.items():
      for line, entry in lines.items():
        if entry['events_per_step'] < 1:
          continue
        print(f"{name} {plane} [{line}] {entry['ms_per_step']:.2f} ms/step: "
              + ', '.join(f'{k} {v:.2f}' for k, v in entry['classes_ms_per_step'].items()),
              file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(json.dumps({n: p['untraced_step_ms']['median'] for n, p in result['programs'].items()}))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
