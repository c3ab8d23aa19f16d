"""The completions server under load: concurrency against one-at-a-time sampling, and open-loop
Poisson arrivals for the server pinned at full width, pinned at a narrower width, and
load-adaptive (widths that give way under load). Loopback only, bounded in count and time.

    .venv/bin/python experiments/bench_serve.py --workdir=RUN \
        --out=results/serve/bench_serve_cpu.json

1. Concurrency: `--concurrency` greedy requests of `--max_tokens` tokens at once, at full width,
   at `--fraction` and by policy adaptive (`RUN@adaptive`), total tokens/s and FLOPs per token;
   against `rag_jax.sample` on the same prompts one at a time (compiled once), in the same run.
2. Open loop: Poisson arrivals at multiples of the full-width server's saturation rate (its
   concurrency throughput / max_tokens), `--requests` per rate, every request streamed: time to
   first token, time per output token (p50, p99), throughput and the mean width, for `full`
   (model RUN, no SLO), `pinned` (RUN@fraction) and `adaptive` (RUN on a server started with
   `--slo_ms`, falling to `--min_fraction`).
Writes the JSON and a plot beside it (.png).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

from absl import app, flags
import httpx
import numpy as np

from rag_jax import cli
from rag_jax import files
from rag_jax import runs
from rag_jax import sample as sample_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained nested RA run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_SLOTS = flags.DEFINE_integer('slots', 16, 'Decode slots of the server.')
_CONCURRENCY = flags.DEFINE_integer('concurrency', 16, 'Requests at once (part 1).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Tokens per request.')
_FRACTION = flags.DEFINE_float('fraction', 0.5, 'The pinned narrow width.')
_RATES = flags.DEFINE_list('rates', ['0.5', '1', '2'], 'Offered loads, x saturation.')
_REQUESTS = flags.DEFINE_integer('requests', 48, 'Requests per offered load.')
_SLO_MS = flags.DEFINE_float('slo_ms', None, 'The adaptive server\'s target time per output '
                             'token (default: 1.5x the full width\'s p50 at half load).')
_MIN_FRACTION = flags.DEFINE_float('min_fraction', 0.25, 'The adaptive server\'s floor.')
_TIME_LIMIT = flags.DEFINE_float('time_limit_s', 120, 'Per offered load, at most.')
_STEPS = flags.DEFINE_integer('steps_per_call', 4, 'The servers\' decode steps per call.')
_OPEN_LOOP = flags.DEFINE_bool('open_loop', True, 'Part 2 (--noopen_loop: the concurrency '
                               'part alone, a few minutes).')
PROMPTS = ['The President', 'Fellow citizens', 'Congress shall', 'In the year', 'Our nation',
           'We must', 'The people of', 'Tonight I']


def start_server(workdir: str, *extra) -> tuple[subprocess.Popen, str, float]:
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, '-m', 'rag_jax.serve', f'--workdir={workdir}',
                           '--port=0', f'--slots={_SLOTS.value}',
                           f'--steps_per_call={_STEPS.value}', *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = proc.stdout.readline()
  if not line.startswith('serving'):
    raise RuntimeError(f'the server did not start: {line!r}')
  ready = time.perf_counter() - start
  url = re.search(r'on (http://\S+) ', line).group(1)
  while httpx.get(f'{url}/health').json()['compiling_batched_prefills']:  # measure after it
    time.sleep(0.5)
  return proc, url, ready


def stop_server(proc):
  proc.send_signal(signal.SIGTERM)
  proc.wait(60)


async def one(client, url, model, prompt, max_tokens, temperature=0.0) -> dict:
  """One streamed request: arrival, first-token and last-token times, tokens, mean width."""
  sent = time.perf_counter()
  first = last = None
  usage = {}
  body = {'model': model, 'prompt': prompt, 'max_tokens': max_tokens,
          'temperature': temperature, 'stream': True}
  async with client.stream('POST', f'{url}/v1/completions', json=body, timeout=600) as r:
    async for line in r.aiter_lines():
      if not line.startswith('data: ') or line == 'data: [DONE]':
        continue
      chunk = json.loads(line[6:])
      now = time.perf_counter()
      if chunk['choices'] and chunk['choices'][0]['text']:
        first = first or now
        last = now
      usage = chunk.get('usage') or usage
  return {'sent': sent, 'first': first, 'last': last, 'tokens': usage['completion_tokens'],
          'width': usage['mean_active_fraction']}


async def concurrent(url, model, n, max_tokens) -> dict:
  """`n` greedy requests at once, not streamed: total tokens/s (median of 3 rounds) and the
  mean FLOPs per token relative to the full width (the usage's)."""
  async def plain(client, prompt):
    body = {'model': model, 'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0}
    r = await client.post(f'{url}/v1/completions', json=body, timeout=600)
    return r.json()['usage']

  rates, flops, shares, steps = [], [], [], []
  async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as client:
    for _ in range(3):
      before = await engine_seconds(client, url)
      start = time.perf_counter()
      usages = await asyncio.gather(*[plain(client, PROMPTS[i % len(PROMPTS)])
                                      for i in range(n)])
      seconds = time.perf_counter() - start
      rates.append(sum(u['completion_tokens'] for u in usages) / seconds)
      d = {k: v - before[k] for k, v in (await engine_seconds(client, url)).items()}
      shares.append({k: d[k] / seconds for k in ('decode', 'prefill')})
      steps.append({'steps': d['steps'], 'ms_per_step': 1000 * d['decode'] / max(d['steps'], 1),
                    'mean_batch': d['slot_steps'] / max(d['steps'], 1)})
      flops += [u['relative_flops'] for u in usages]
  median = lambda rows: {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
  return {'tokens_per_sec': float(np.median(rates)), 'rounds': rates,
          'relative_flops': float(np.mean(flops)),
          # The share of each round's wall time the scheduler spent inside engine calls.
          'engine_share': median(shares),
          # Decode steps a round ran, the engine's time per step and the tokens a step chose.
          'decode_steps': median(steps)}


async def engine_seconds(client, url) -> dict[str, float]:
  """The server's counters: rag_engine_seconds ({'decode': s, 'prefill': s}), the decode
  steps run ('steps') and the tokens they chose over all slots ('slot_steps')."""
  text = (await client.get(f'{url}/metrics')).text
  out = {'decode': 0.0, 'prefill': 0.0, 'steps': 0.0, 'slot_steps': 0.0}
  for line in text.splitlines():
    if line.startswith('rag_engine_seconds_total{'):
      call = line.split('call="')[1].split('"')[0]
      out[call] = float(line.rsplit(' ', 1)[1])
    elif line.startswith(('rag_decode_steps_total ', 'rag_decode_slot_steps_total ')):
      name = 'steps' if line.startswith('rag_decode_steps') else 'slot_steps'
      out[name] = float(line.rsplit(' ', 1)[1])
  return out


async def open_loop(url, model, rate, n, max_tokens, time_limit) -> dict:
  """Poisson arrivals at `rate` requests/s (seeded), all awaited or cut at the time limit."""
  rng = np.random.default_rng(0)
  gaps = rng.exponential(1 / rate, n)
  async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as client:
    start, tasks = time.perf_counter(), []
    for i, gap in enumerate(gaps):
      await asyncio.sleep(gap)
      tasks.append(asyncio.create_task(one(client, url, model, PROMPTS[i % len(PROMPTS)],
                                           max_tokens)))
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for t in pending:
      t.cancel()
    seconds = time.perf_counter() - start
  rows = [t.result() for t in done if not t.exception()]
  ttft = [r['first'] - r['sent'] for r in rows if r['first']]
  tpot = [(r['last'] - r['first']) / (r['tokens'] - 1) for r in rows if r['tokens'] > 1]
  pct = lambda xs, q: 1000 * float(np.percentile(xs, q)) if xs else None
  return {'rate': rate, 'completed': len(rows), 'unfinished': len(pending),
          'tokens_per_sec': sum(r['tokens'] for r in rows) / seconds,
          'ttft_ms_p50': pct(ttft, 50), 'ttft_ms_p99': pct(ttft, 99),
          'tpot_ms_p50': pct(tpot, 50), 'tpot_ms_p99': pct(tpot, 99),
          'mean_width': float(np.mean([r['width'] for r in rows])) if rows else None}


def one_at_a_time(workdir, n, max_tokens) -> dict:
  """`rag_jax.sample`, greedy, the same prompts one after another."""
  run = runs.load_run(workdir)
  sample = lambda p: sample_lib.sample(run.params, run.config, p, tokenizer=run.tokenizer,
                                       num_tokens=max_tokens, greedy=True)
  outs = [sample(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
  # Generation time only: each call also compiles its program, which its `seconds` leave out.
  return {'tokens_per_sec': sum(o.num_generated for o in outs) / sum(o.seconds for o in outs)}


def main(argv):
  del argv
  workdir, name = _WORKDIR.value, os.path.basename(_WORKDIR.value.rstrip('/'))
  n, m, a = _CONCURRENCY.value, _MAX_TOKENS.value, _FRACTION.value
  out = {'workdir': workdir, 'slots': _SLOTS.value, 'max_tokens': m, 'fraction': a,
         'command': ' '.join(sys.argv), 'cores': os.cpu_count()}
  out['sample_one_at_a_time'] = one_at_a_time(workdir, n, m)
  proc, url, out['ready_seconds'] = start_server(workdir)
  try:
    out['concurrent_full'] = asyncio.run(concurrent(url, name, n, m))
    out['concurrent_pinned'] = asyncio.run(concurrent(url, f'{name}@{a:g}', n, m))
    # Policy adaptive (narrow 0.5, escalating by confidence at the server's threshold).
    out['concurrent_policy_adaptive'] = asyncio.run(concurrent(url, f'{name}@adaptive', n, m))
    saturation = out['concurrent_full']['tokens_per_sec'] / m
    out['saturation_requests_per_sec'] = saturation
    rates = [float(r) * saturation for r in _RATES.value] if _OPEN_LOOP.value else []
    for variant, model in (('full', name), ('pinned', f'{name}@{a:g}')):
      out[variant] = [asyncio.run(open_loop(url, model, r, _REQUESTS.value, m,
                                            _TIME_LIMIT.value)) for r in rates]
  finally:
    stop_server(proc)
  out['adaptive'] = []
  if rates:
    slo = _SLO_MS.value or 1.5 * out['full'][0]['tpot_ms_p50']
    out['slo_ms'] = slo
    proc, url, _ = start_server(workdir, f'--slo_ms={slo}',
                                f'--min_fraction={_MIN_FRACTION.value}')
    try:
      out['adaptive'] = [asyncio.run(open_loop(url, name, r, _REQUESTS.value, m,
                                               _TIME_LIMIT.value)) for r in rates]
    finally:
      stop_server(proc)
  out['ratios'] = {
      'concurrent_full_over_sample': out['concurrent_full']['tokens_per_sec'] /
                                     out['sample_one_at_a_time']['tokens_per_sec'],
      'pinned_over_full': out['concurrent_pinned']['tokens_per_sec'] /
                          out['concurrent_full']['tokens_per_sec']}
  files.write_json(_OUT.value, out)
  if out['full']:
    plot(out, os.path.splitext(_OUT.value)[0] + '.png')
  print(json.dumps(out['ratios'], indent=1))
  for k in ('concurrent_full', 'concurrent_pinned', 'concurrent_policy_adaptive'):
    share = out[k]['engine_share']
    print(f"{k}: {out[k]['tokens_per_sec']:.0f} tok/s; the scheduler inside the engine "
          f"{100 * share['decode']:.0f}% (decode) + {100 * share['prefill']:.0f}% (prefill) "
          f"of the wall time; {out[k]['decode_steps']['steps']:.0f} decode steps a round, "
          f"{out[k]['decode_steps']['ms_per_step']:.2f} ms each, carrying "
          f"{out[k]['decode_steps']['mean_batch']:.1f} requests")
  for variant in ('full', 'pinned', 'adaptive'):
    for r in out[variant]:
      print(f"{variant:>8} {r['rate']:6.1f} req/s: {r['tokens_per_sec']:7.0f} tok/s, TPOT p50 "
            f"{r['tpot_ms_p50']:.1f} p99 {r['tpot_ms_p99']:.1f} ms, TTFT p99 "
            f"{r['ttft_ms_p99']:.0f} ms, width {r['mean_width']:.2f}, "
            f"{r['unfinished']} unfinished")


def plot(out: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for variant in ('full', 'pinned', 'adaptive'):
    rows = out[variant]
    rates = [r['rate'] for r in rows]
    axes[0].plot(rates, [r['tpot_ms_p99'] for r in rows], 'o-', label=variant)
    axes[1].plot(rates, [r['ttft_ms_p99'] for r in rows], 'o-', label=variant)
    axes[2].plot(rates, [r['tokens_per_sec'] for r in rows], 'o-', label=variant)
  axes[0].axhline(out['slo_ms'], color='gray', ls='--', label='SLO')
  for ax, title in zip(axes, ('p99 time per output token (ms)', 'p99 time to first token (ms)',
                              'throughput (tokens/s)')):
    ax.set_xlabel('offered load (requests/s)')
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
