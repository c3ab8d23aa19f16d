"""Runs an ablation: train then evaluate every run of a sweep file, each in its own workdir.

    python experiments/sweep.py --config=configs/ablations/alpha_beta_lambda.py[:smoke] \
        --sweep_dir=runs/alpha_beta_lambda [--list] [--jobs=N] [--emit=run_all.sh]

Every run (rag_jax.sweeps: one override dict of the file's `sweep(arg)`) goes to
SWEEP_DIR/NAME, NAME made of its overrides, and executes

    python -m rag_jax.train --config=FILE:ARG --workdir=SWEEP_DIR/NAME --config.FIELD=VALUE ...
    python -m rag_jax.evaluate --workdir=SWEEP_DIR/NAME --active_fractions=1.0,0.75,0.5,0.25
    python -m rag_jax.evaluate --workdir=SWEEP_DIR/NAME --policy=random      (RA runs only)

with its output in SWEEP_DIR/NAME/sweep.log. Every override is checked against the base config
before anything runs. A run whose eval_curve.json holds all the expected entries is skipped (a
half-trained one resumes from its checkpoint); a failing run is reported at the end while the
others go on, and the exit status is then 1. `--list` prints the runs; `--emit=FILE` writes
the commands as a shell script (for a cluster or a TPU pod) instead of running them.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags
import tqdm

from rag_jax import configuration
from rag_jax import errors
from rag_jax import sweeps
from rag_jax import train
from rag_jax import workdir as workdir_lib

LOG_FILE = 'sweep.log'


def _define_flags():
  flags.DEFINE_string('config', None, 'Sweep file: configs/ablations/NAME.py[:ARG].',
                      required=True)
  flags.DEFINE_string('sweep_dir', None, 'Directory of the runs\' workdirs.')
  flags.DEFINE_bool('list', False, 'Print the runs (name, overrides, status) and exit.')
  flags.DEFINE_integer('jobs', 1, 'Runs executed at the same time.', lower_bound=1)
  flags.DEFINE_string('emit', None, 'Write the commands to this shell script instead.')
  flags.DEFINE_list('active_fractions', ['1.0', '0.75', '0.5', '0.25'],
                    'Fixed active fractions each run is evaluated at.')
  flags.DEFINE_enum('split', 'validation', ['train', 'validation', 'test'],
                    'Split the runs are evaluated on.')
  flags.DEFINE_multi_string('only', None, 'Only this run: its name or index in --list (or its '
                            'whole name where --list shortens it); repeatable.')


def commands(run: sweeps.Run, spec: str, workdir: str, fractions: list[str], split: str,
             python: str = sys.executable) -> list[list[str]]:
  """The train and evaluate command lines of one run."""
  evaluate = [python, '-m', 'rag_jax.evaluate', f'--workdir={workdir}', f'--split={split}']
  cmds = [[python, '-m', 'rag_jax.train', f'--config={spec}', f'--workdir={workdir}',
           *run.flags()],
          evaluate + [f'--active_fractions={",".join(fractions)}']]
  if run.random_activation:
    cmds.append(evaluate + ['--policy=random'])
  return cmds


def finished(run: sweeps.Run, workdir: str, fractions: list[str], split: str) -> bool:
  """Whether eval_curve.json holds every entry the run's evaluation writes."""
  try:
    with open(os.path.join(workdir, workdir_lib.EVAL_CURVE_FILE)) as f:
      curve = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  have = {(e.get('policy'), round(e.get('active_fraction', -1), 6)) for e in curve
          if e.get('split', 'validation') == split}
  want = {('fixed', round(float(a), 6)) for a in fractions}
  if not want <= have:
    return False
  return not run.random_activation or any(p == 'random' for p, _ in have)


def check_workdir(run: sweeps.Run, workdir: str) -> None:
  """A workdir already there must hold this very run (same full config), or nothing."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    return
  diffs = [f'{k}: {old!r} there, {new!r} here' for k, (old, new) in
           configuration.diff(workdir_lib.load_config(workdir), run.config).items()]
  if diffs:
    raise errors.WorkdirError(
        f'{workdir} holds a run of another config ({"; ".join(diffs[:4])}). Use another '
        '--sweep_dir, or move that workdir away.')


def execute(run: sweeps.Run, cmds: list[list[str]], workdir: str) -> dict | None:
  """Runs the commands in order, output appended to workdir/sweep.log; None, or what failed."""
  os.makedirs(workdir, exist_ok=True)
  if not os.listdir(workdir):  # a workdir of the sweep's making: train's own (its marker)
    workdir_lib.mark_workdir(workdir, 'experiments/sweep.py')
  log_path = os.path.join(workdir, LOG_FILE)
  start = time.perf_counter()
  with open(log_path, 'a') as log:
    for cmd in cmds:
      log.write(f'$ {shlex.join(cmd)}\n')
      log.flush()
      offset = log.tell()
      code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
      if code:
        return {'run': run.name, 'command': cmd[2], 'returncode': code, 'log': log_path,
                'error': _last_error(log_path, offset)}
    log.write(f'# finished in {time.perf_counter() - start:.1f} s\n')
  return None


def _last_error(log_path: str, offset: int) -> str:
  """The last error line a command wrote to the log from `offset` on (else its last line)."""
  with open(log_path, 'rb') as f:
    f.seek(offset)
    text = f.read().decode(errors='replace')
  lines = [l.strip() for l in text.replace('\r', '\n').splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:') or 'Error' in l]
  return (errors or lines or ['(no output)'])[-1][:300]


def emit_script(path: str, runs: list[sweeps.Run], spec: str, sweep_dir: str,
                fractions: list[str], split: str) -> None:
  """A bash script with one function per run; `bash FILE I` runs run I, `bash FILE` all."""
  lines = [
      '#!/usr/bin/env bash',
      f'# {len(runs)} runs of {spec} into {sweep_dir}, written by experiments/sweep.py.',
      '# From the repository root:',
      f'#   bash {path}          every run, one after the other (a failure does not stop the rest)',
      f'#   bash {path} I        run I only (0-based): one task of a cluster array job',
      '#   PYTHON=python3 bash ...  the interpreter (default: python).',
      '# On a TPU pod, start the same command on every host (e.g. gcloud compute tpus tpu-vm ssh',
      '# NAME --worker=all --command="cd rag_jax && bash run_all.sh I").',
      'set -u',
      'PYTHON="${PYTHON:-python}"',
      '']
  for i, run in enumerate(runs):
    workdir = os.path.join(sweep_dir, run.name)
    cmds = commands(run, spec, workdir, fractions, split, python='"$PYTHON"')
    body = ' \\\n    && '.join(' '.join([c[0]] + [shlex.quote(a) for a in c[1:]]) for c in cmds)
    lines += [f'run_{i}() {{  # {run.name}', f'  mkdir -p {shlex.quote(workdir)} \\',
              f'    && {body}', '}', '']
  lines += [
      'if [[ $# -gt 0 ]]; then "run_$1"; exit $?; fi',
      'failed=()',
      f'for i in $(seq 0 {len(runs) - 1}); do "run_$i" || failed+=("$i"); done',
      'if [[ ${#failed[@]} -gt 0 ]]; then echo "failed runs: ${failed[*]}" >&2; exit 1; fi']
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  os.chmod(path, 0o755)


def select(runs: list[sweeps.Run], only: list[str]) -> list[sweeps.Run]:
  """The runs `--only` names, in the sweep's order: each entry is a run's index in --list,
  its listed name or its whole name (--list shortens a name over 120 characters to its start
  and a digest: sweeps.run_name)."""
  chosen, unknown = set(), []
  for entry in only:
    if entry.isdigit():
      hits = [int(entry)] if int(entry) < len(runs) else []
    else:
      hits = [i for i, r in enumerate(runs)
              if entry in (r.name, sweeps.full_run_name(r.overrides))]
    chosen.update(hits)
    if not hits:
      unknown.append(entry)
  if unknown:
    raise ValueError(f'--only names no run of this sweep ({len(runs)} runs): {unknown}; '
                     'give a name or an index from --list.')
  return [r for i, r in enumerate(runs) if i in chosen]


def prepare(spec: str, sweep_dir: str | None, fractions: list[str],
            only: list[str] | None = None) -> list[sweeps.Run]:
  """The runs to consider, every one checked before anything runs (ValueError if not)."""
  for a in fractions:
    if not 0 < float(a) <= 1:
      raise ValueError(f'--active_fractions must be in (0, 1], got {a}.')
  runs = sweeps.expand(spec)
  if only:
    runs = select(runs, only)
  for run in runs:  # what `train` checks before it builds anything (the same function)
    try:
      train.check_config(run.config, run.overrides)
    except ValueError as e:
      raise ValueError(f'run {run.name}: {e} (nothing was run)') from None
  for run in runs if sweep_dir else ():
    check_workdir(run, os.path.join(sweep_dir, run.name))
  return runs


def run_all(runs: list[sweeps.Run], spec: str, sweep_dir: str, fractions: list[str], split: str,
            jobs: int, done: set[str]) -> list[dict]:
  """Executes the unfinished runs, `jobs` at a time, under a progress bar; the failures."""
  todo = [r for r in runs if r.name not in done]
  print(f'{spec}: {len(runs)} runs in {sweep_dir}: {len(done)} finished, {len(todo)} to run '
        f'({jobs} at a time).', flush=True)
  failures = []
  bar = tqdm.tqdm(total=len(runs), initial=len(runs) - len(todo), desc='sweep', unit='run',
                  dynamic_ncols=True)
  pool = concurrent.futures.ThreadPoolExecutor(jobs)
  futures = {}
  for run in todo:
    workdir = os.path.join(sweep_dir, run.name)
    futures[pool.submit(execute, run, commands(run, spec, workdir, fractions, split),
                        workdir)] = run
  try:
    for future in concurrent.futures.as_completed(futures):
      failure = future.result()
      if failure:
        failures.append(failure)
        tqdm.tqdm.write(f'FAILED {failure["run"]} ({failure["command"]}): {failure["error"]}')
      bar.update(1)
      bar.set_postfix(failed=len(failures), last=futures[future].name)
  finally:  # on Ctrl-C, start no further run (the running commands got the signal too).
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
  return sorted(failures, key=lambda fail: fail['run'])


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  spec, sweep_dir, fractions, split = f.config, f.sweep_dir, f.active_fractions, f.split
  try:
    if not sweep_dir and not f.list:
      raise ValueError('--sweep_dir is required to run or --emit a sweep.')
    runs = prepare(spec, sweep_dir, fractions, f.only)
  except ValueError as e:  # errors.ConfigError and workdir.WorkdirError among them.
    sys.exit(f'error: {spec}: {e}')
  done = {r.name for r in runs
          if sweep_dir and finished(r, os.path.join(sweep_dir, r.name), fractions, split)}

  if f.list:  # each run's index in the whole sweep (what --only takes), also under --only
    index = {r.name: i for i, r in enumerate(sweeps.expand(spec))}
    width = max(len(r.name) for r in runs)
    for run in runs:
      i = index[run.name]
      status = ('done' if run.name in done else 'todo') if sweep_dir else ''
      overrides = ' '.join(f'{k}={sweeps.flag_value(v)}' for k, v in sorted(run.overrides.items()))
      print(f'{i:3d}  {run.name:<{width}}  {overrides}  {status}'.rstrip())
  elif f.emit:
    emit_script(f.emit, runs, spec, sweep_dir, fractions, split)
    print(f'wrote {f.emit}: {len(runs)} runs ({len(done)} already finished here)')
  else:
    failures = run_all(runs, spec, sweep_dir, fractions, split, f.jobs, done)
    if failures:
      print(f'\n{len(failures)} of {len(runs) - len(done)} run(s) failed:', file=sys.stderr)
      for fail in failures:
        print(f'  {fail["run"]}: {fail["command"]} exited with {fail["returncode"]}: '
              f'{fail["error"]}\n    log: {fail["log"]}', file=sys.stderr)
      sys.exit(1)
    print(f'all {len(runs)} runs finished; next: python experiments/collect.py '
          f'--sweep_dir={sweep_dir}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
