"""Fingerprints of the compiled programs that the benchmarks time: a hash of XLA's optimized HLO
(source locations and names stripped) and XLA's FLOP count, for the train step (dense and random
activation), the forward pass at a static width, and the decode loop (fixed width and per-token
draws).

    python experiments/hlo_fingerprint.py --out=results/reshape/hlo_this.json
    cp experiments/hlo_fingerprint.py /tmp/old_tree/experiments/    # another checkout
    (cd /tmp/old_tree && PYTHONPATH=. python experiments/hlo_fingerprint.py --out=/tmp/hlo_old.json)

Two checkouts whose fingerprints agree compile the same programs, so they run at the same speed
whatever the noise of a shared machine: this is how a change of form (a refactor) shows that it
moved no benchmark. The script builds each program through the package's public functions of
either layout (rag_jax.runs / sharding, or the older train.make_model / train.Shardings).
"""
from __future__ import annotations

import hashlib
import json
import re

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections

import bench_common

from rag_jax import cli
from rag_jax import activation
from rag_jax import sample as sample_lib
from rag_jax import train

if hasattr(train, 'make_model'):  # before the reshape, train held these functions.
  _HOMES = (train,)
else:
  from rag_jax import runs as _runs, sharding as _sharding  # pylint: disable=g-import-not-at-top
  _HOMES = (_runs, _sharding)

_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)
_DUMP = flags.DEFINE_string('dump_dir', None, 'Also write each normalized HLO text here.')


def _api(name):
  """`name` from rag_jax.runs / rag_jax.sharding, or from rag_jax.train before they existed."""
  return next(getattr(m, name) for m in _HOMES if hasattr(m, name))


def normalize(text: str) -> str:
  """HLO text without what differs between two traces of the same program: source locations
  (metadata, the FileNames..StackFrames tables) and instruction and computation names (renamed
  in order of first appearance, so an op that the optimizer removed shifts no name)."""
  text = re.sub(r', metadata=\{[^}]*\}', '', text)
  out, tables = [], False
  for line in text.split('\n'):
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      tables = True
      continue
    if tables and line.startswith(('%', 'ENTRY', 'HloModule')):
      tables = False
    if not tables:
      out.append(line)
  text = '\n'.join(out)
  names, params = {}, {}
  text = re.sub(r'%[A-Za-z_][\w.\-]*', lambda m: names.setdefault(m[0], f'%v{len(names)}'), text)
  text = re.sub(r'\bparam_\d+(?:\.\d+)*\b', lambda m: params.setdefault(m[0], f'p{len(params)}'),
                text)
  return re.sub(r'^HloModule \S+', 'HloModule m', text, flags=re.M)


def fingerprint(compiled, name: str) -> dict:
  text = normalize(compiled.as_text())
  if _DUMP.value:
    with open(f'{_DUMP.value}/{name}.hlo', 'w') as f:
      f.write(text)
  return {'hlo_sha1': hashlib.sha1(text.encode()).hexdigest(), 'hlo_lines': text.count('\n'),
          'xla_flops': bench_common.xla_flops(compiled)}


def train_step(name: str, spec: str, **act) -> dict:
  config = bench_common.load_config(spec)
  config.activation.update(act)
  model, tx = _api('make_model')(config, 65), _api('make_optimizer')(config)
  init = lambda k: _api('init_state')(model, tx, k, config)
  mesh = _api('make_mesh')(config)
  shard = _api('Shardings').of(mesh, jax.eval_shape(init, jax.random.key(0)))
  state = jax.eval_shape(init, jax.random.key(0))
  batch = jax.ShapeDtypeStruct((config.batch_size, config.model.block_size + 1), jnp.int32)
  with jax.set_mesh(mesh):
    step = train.jit_train_step(model, tx, config, shard)
    return fingerprint(step.lower(state, batch, jax.random.key(0)).compile(), name)


def forward_and_decode(spec: str) -> dict:
  config = bench_common.load_config(spec)
  model = _api('make_model')(config, 65)
  tokens = jnp.zeros((1, config.model.block_size), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  act = config.activation
  out = {}
  plan = activation.make_plan(jax.random.key(0), act, model.cfg, fraction=0.5)
  out['forward_a0.5'] = fingerprint(
      jax.jit(lambda p, t: model.apply({'params': p}, t, plan=plan)[0]).lower(params, tokens)
      .compile(), 'forward_a0.5')
  frozen = ml_collections.FrozenConfigDict(act)
  prompt = jnp.ones((1, 1), jnp.int32)
  for policy, a in (('dense', None), ('fixed', 0.5), ('random', None)):
    knobs = dict(num_tokens=2 * config.model.block_size, greedy=True, policy=policy,
                 active_fraction=a, act=None if policy == 'dense' else frozen)
    out[f'decode_{policy}'] = fingerprint(
        sample_lib.generate.lower(params, model, prompt, jax.random.key(0), **knobs).compile(),
        f'decode_{policy}')
  return out


def main(argv):
  del argv
  result = {'train_dense': train_step('train_dense', 'configs/shakespeare_char.py'),
            'train_ra': train_step('train_ra', 'configs/ra_shakespeare_char.py'),
            'train_ra_layers': train_step('train_ra_layers', 'configs/ra_shakespeare_char.py',
                                          sites='mlp,heads,layers'),
            **forward_and_decode('configs/ra_shakespeare_char.py'),
            **bench_common.environment()}
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if isinstance(v, dict)}, indent=1))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
