"""rag_jax.export: a fixed fraction of a run as a smaller dense model that computes what the
parent computes at that fraction; safetensors weights, int8; bad inputs refused."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax import activation
from rag_jax import errors
from rag_jax import evaluate
from rag_jax import export
from rag_jax import runs
from rag_jax import sample
from rag_jax import train
from rag_jax import weights
from rag_jax.models import gpt
from rag_jax.models import submodel
from tests.conftest import ROOT, load_config, snapshot

CFG = gpt.GPTConfig(vocab_size=50, num_layers=4, num_heads=4, embed_dim=32, mlp_dim=64,
                    block_size=16, use_bias=True)


def _act(sites, rescale=False):
  act = activation.default_config()
  act.update(enabled=True, lam=0.75, sites=sites, buckets=4, rescale=rescale)
  return act


@pytest.mark.slow
@pytest.mark.parametrize('sites,fraction,rescale', [
    ('mlp', 0.5, False), ('heads', 0.25, False), ('layers', 0.5, False),
    ('mlp,heads,layers', 0.75, False), ('mlp,heads', 0.5, True), ('mlp,heads', 1.0, False)])
def test_sub_model_equals_the_parent_at_its_fraction(sites, fraction, rescale):
  params = runs.init_params(gpt.GPT(CFG), jax.random.key(0))
  plan = activation.make_plan(jax.random.key(1), _act(sites, rescale), CFG, fraction)
  sub, shape, kept = submodel.slice_params(jax.device_get(params), CFG, plan)
  sub_cfg = gpt.GPTConfig(**{**CFG.__dict__, **shape})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 16)), jnp.int32)
  want, _ = gpt.GPT(CFG).apply({'params': params}, tokens, plan=plan)
  got, _ = gpt.GPT(sub_cfg).apply({'params': sub}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  n = {'mlp': 64, 'heads': 4, 'layers': 4}
  expect = {s: (round(fraction * n[s]) if s in sites else n[s]) for s in n}
  assert (shape['mlp_dim'], shape['num_heads'], shape['num_layers']) == (
      expect['mlp'], expect['heads'], expect['layers'])
  assert shape['head_dim'] == 8 and len(kept) == shape['num_layers']
  # The smaller model's KV cache holds only its heads and blocks.
  cache = gpt.init_cache(sub_cfg, 1)
  assert len(cache) == expect['layers'] and cache[0]['k'].shape[2] == expect['heads']


@pytest.mark.parametrize('fraction,kept', [(0.5, [0, 3]), (0.75, [0, 2, 3]), (0.25, [0])])
def test_spaced_blocks_export(fraction, kept):
  """Under layer_schedule 'spaced' a fixed fraction keeps evenly spaced blocks; the exported
  model holds those blocks, in order, and computes what the parent does."""
  params = runs.init_params(gpt.GPT(CFG), jax.random.key(0))
  act = _act('mlp,layers')
  act.layer_schedule = 'spaced'
  plan = activation.make_plan(jax.random.key(1), act, CFG, fraction)
  sub, shape, units = submodel.slice_params(jax.device_get(params), CFG, plan)
  assert [u['layer'] for u in units] == kept and shape['num_layers'] == len(kept)
  np.testing.assert_array_equal(sub[f'block_{len(kept) - 1}']['mlp']['w_out'][:2],
                                np.asarray(params[f'block_{kept[-1]}']['mlp']['w_out'])[:2])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 16)), jnp.int32)
  want, _ = gpt.GPT(CFG).apply({'params': params}, tokens, plan=plan)
  got, _ = gpt.GPT(gpt.GPTConfig(**{**CFG.__dict__, **shape})).apply({'params': sub}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_per_layer_plan_exports_as_blocks_of_their_own_widths():
  """A per-layer plan (each block its own heads and units) slices into a model whose config
  lists them: it equals the parent under the plan, its FLOPs are the plan's, its KV cache holds
  each block's heads, and GPT-2's layout refuses it."""
  from rag_jax import flops, hf_gpt2, search
  params = runs.init_params(gpt.GPT(CFG), jax.random.key(0))
  act = _act('mlp,heads')
  buckets = {'mlp': [3, 1, 0, 2], 'heads': [1, 3, 0, 2]}
  plan = activation.plan_of(buckets, act, CFG, static=True)
  sub, shape, kept = submodel.slice_params(jax.device_get(params), CFG, plan)
  assert shape['layer_heads'] == (2, 4, 1, 3) and shape['layer_mlp_dims'] == (64, 32, 16, 48)
  sub_cfg = gpt.GPTConfig(**{**CFG.__dict__, **shape})
  assert sub_cfg.per_layer and sub_cfg.block(2).num_heads == 1
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 16)), jnp.int32)
  want, _ = gpt.GPT(CFG).apply({'params': params}, tokens, plan=plan)
  got, _ = gpt.GPT(sub_cfg).apply({'params': sub}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The plan's FLOPs in the parent, less the keys and values of the heads it drops.
  dropped_kv = 2 * CFG.embed_dim * 2 * CFG.head_dim * (4 * 4 - sum(shape['layer_heads']))
  assert flops.flops_per_token(sub_cfg) == pytest.approx(
      search.plan_flops(buckets, act, CFG) - dropped_kv)
  assert [c['k'].shape[2] for c in gpt.init_cache(sub_cfg, 1)] == [2, 4, 1, 3]
  # Decoding with the per-block cache equals the parallel pass.
  logits, cache = gpt.GPT(sub_cfg).apply({'params': sub}, tokens[:, :8],
                                         cache=gpt.init_cache(sub_cfg, 3), pos=0)
  step, _ = gpt.GPT(sub_cfg).apply({'params': sub}, tokens[:, 8:9], cache=cache, pos=8)
  np.testing.assert_allclose(step[:, 0], got[:, 8], atol=1e-4, rtol=1e-4)
  with pytest.raises(hf_gpt2.NotRepresentable, match='per-layer plan'):
    hf_gpt2.to_hf(jax.device_get(sub), sub_cfg)


def test_random_structure_does_not_export():
  act = _act('mlp')
  act.structure = 'random'
  with pytest.raises(ValueError, match="structure is 'random'.*only nested widths export"):
    submodel.check_fraction(act, CFG, 0.5)
  with pytest.raises(ValueError, match=r'0.3 is not one of the widths .*0.25, 0.5, 0.75, 1'):
    submodel.check_fraction(_act('mlp'), CFG, 0.3)
  with pytest.raises(ValueError, match='keeps no whole number of the 4 blocks'):
    submodel.check_fraction(_act('layers'), CFG, 0.6)


def test_safetensors_round_trip_and_int8_error(tmp_path):
  params = jax.device_get(runs.init_params(gpt.GPT(CFG), jax.random.key(0)))
  sliced = {'w_in': np.asarray(params['block_0']['mlp']['w_in'])[:, ::2]}
  assert not sliced['w_in'].flags['C_CONTIGUOUS']  # stored scrambled before weights.py fixed it
  for tree in (params, {'block_0': {'mlp': sliced}}):
    weights.save(tree, str(tmp_path))
    back = weights.load_params(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, tree))
  weights.save(params, str(tmp_path), int8=True)
  tensors = weights.to_tensors(params, int8=True)
  back = weights.load_params(str(tmp_path))
  for name, w in weights.flatten(params).items():
    leaf = name.split('/')[-1]
    got = weights.flatten(back)[name]
    if leaf in weights.INPUT_AXES:
      assert tensors[f'{name}:int8'].dtype == np.int8
      scale = tensors[f'{name}:scale']
      assert np.all(np.abs(got - w) <= scale / 2 + 1e-7), name  # within half a scale step
    else:
      np.testing.assert_array_equal(got, w)


@pytest.fixture(scope='module')
def run(tmp_path_factory, tfds_dir):
  """A smoke RA run (mlp, heads; 4 buckets) of a few steps."""
  config = load_config('ra_shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  config.update(num_steps=20, checkpoint_every=20, eval_every=20, log_every=20)
  workdir = str(tmp_path_factory.mktemp('parent'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_export_scores_what_its_parent_scores(run, tmp_path):
  parent = {e['active_fraction']: e['loss'] for e in
            evaluate.evaluate(run, (1.0, 0.5, 0.25), split='test')}
  for fraction in (1.0, 0.5, 0.25):
    out = str(tmp_path / f'a{fraction}')
    record = export.export(run, fraction, out)
    (entry,) = evaluate.evaluate(out, (1.0,), split='test')
    assert abs(entry['loss'] - parent[fraction]) < 1e-5, (fraction, entry['loss'], parent)
    assert record['parameters'] < record['parent_parameters'] or fraction == 1.0
    assert abs(record['bytes'] / (4 * record['parameters']) - 1) < 0.05  # float32 + header
  q = export.export(run, 0.5, str(tmp_path / 'int8'), int8=True)
  (entry,) = evaluate.evaluate(str(tmp_path / 'int8'), (1.0,), split='test')
  assert abs(entry['loss'] / parent[0.5] - 1) < 0.005  # int8 costs under 0.5%
  assert q['bytes'] < 0.4 * record['bytes'] * q['parameters'] / record['parameters'] + 1
  # sample takes the export as it takes a workdir; greedy equals the parent's fixed width.
  sub = runs.load_run(str(tmp_path / 'a0.5'))
  parent_run = runs.load_run(run)
  got = sample.sample(sub.params, sub.config, 'ROMEO:', tokenizer=sub.tokenizer, num_tokens=12,
                      greedy=True)
  want = sample.sample(parent_run.params, parent_run.config, 'ROMEO:',
                       tokenizer=parent_run.tokenizer, num_tokens=12, greedy=True,
                       active_fraction=0.5)
  assert got.text == want.text


@pytest.mark.slow
def test_plan_file_export_scores_what_its_parent_scores(run, tmp_path, tfds_env):
  """`export --plan=FILE` (a rag_jax.search result): the export evaluates (at a = 1 only)
  to the parent's loss under the plan, samples, fine-tunes, and bad plan files are refused."""
  parent = runs.load_run(run)
  buckets = {'mlp': [3, 1], 'heads': [1, 2]}
  plan_file = tmp_path / 'plan.json'
  plan_file.write_text(json.dumps({'buckets': buckets, 'flops_per_token': 1.0}))
  out = str(tmp_path / 'per_layer')
  record = export.export(run, None, out, plan_file=str(plan_file))
  assert record['model']['layer_heads'] == (2, 3) and record['model']['layer_mlp_dims'] == (128, 64)
  assert not record['huggingface']['written'] and 'per-layer' in record['huggingface']['why']
  plan = activation.plan_of(buckets, parent.config.activation, parent.model.cfg, static=True)
  tokens = evaluate.data_lib.load(parent.config, parent.tokenizer, ('test',)).splits['test']
  step = jax.jit(evaluate.make_eval_step(parent.model, lambda key, shape: plan))
  want = evaluate.mean_loss(step, parent.params, tokens, parent.config)[0]
  (entry,) = evaluate.evaluate(out, (1.0,), split='test')
  assert abs(entry['loss'] - want) < 1e-5
  with pytest.raises(ValueError, match='scores at --active_fractions=1 only'):
    evaluate.evaluate(out, (1.0, 0.5))
  with pytest.raises(ValueError, match='already holds blocks of their own widths'):
    export.export(out, 0.5, str(tmp_path / 'again'))
  sub = runs.load_run(out)
  assert sample.sample(sub.params, sub.config, 'ROMEO:', tokenizer=sub.tokenizer, num_tokens=5,
                       greedy=True).text[0].startswith('ROMEO:')
  config = load_config('shakespeare_char', 'smoke')
  config.data.data_dir = parent.config.data.data_dir
  config.update(init_from=out, num_steps=2, eval_every=2, checkpoint_every=2, log_every=1)
  config.opt.warmup_steps = 1
  with pytest.raises(errors.WorkdirError, match='layer_heads'):  # the config must say its shape
    train.train_and_evaluate(config, str(tmp_path / 'tune0'))
  config.model.update(num_heads=3, head_dim=8, layer_heads=(2, 3), layer_mlp_dims=(128, 64))
  train.train_and_evaluate(config, str(tmp_path / 'tune'))
  for bad, message in (({'mlp': [3, 1, 0]}, r'one bucket in 0..3 for each of the 2 blocks'),
                       ({'layers': [1, 1]}, "site 'layers' is not a width site"),
                       ({'mlp': [4, 0]}, r'one bucket in 0..3')):
    plan_file.write_text(json.dumps({'buckets': bad}))
    with pytest.raises(ValueError, match=message):
      export.export(run, None, str(tmp_path / 'bad'), plan_file=str(plan_file))
  assert not os.path.exists(tmp_path / 'bad')
  proc = subprocess.run([sys.executable, '-m', 'rag_jax.export', f'--workdir={run}',
                         f'--plan={plan_file}', '--active_fraction=0.5', f'--out={tmp_path / "z"}'],
                        cwd=ROOT, env=tfds_env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      'error: give --active_fraction or --plan, not both.')


@pytest.mark.slow
def test_bad_exports_are_refused_and_overwrite_nothing(run, tmp_path, tfds_env):
  out = str(tmp_path / 'out')
  export.export(run, 0.5, out)
  export.export(run, 0.5, out)  # the same export again is fine
  before = snapshot(out)
  with pytest.raises(errors.WorkdirError, match=r'holds another export \(.* at 0.5, int8 False\)'):
    export.export(run, 0.25, out)
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(errors.WorkdirError, match='holds other files'):
    export.export(run, 0.5, str(other))
  with pytest.raises(errors.WorkdirError, match='holds no checkpoint'):
    empty = tmp_path / 'empty'
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns('checkpoints'))
    export.export(str(empty), 0.5, str(tmp_path / 'x'))
  with pytest.raises(errors.WorkdirError, match=r'written by rag_jax.export or rag_jax.convert, '
                     r'not a run; fine-tune it in a new --workdir with --config.init_from='):
    config = load_config('ra_shakespeare_char', 'smoke')
    train.train_and_evaluate(config, out)
  assert snapshot(out) == before
  with open(os.path.join(out, 'export.json')) as f:
    assert json.load(f)['active_fraction'] == 0.5
  proc = subprocess.run([sys.executable, '-m', 'rag_jax.export', f'--workdir={run}',
                         '--active_fraction=0.3', f'--out={tmp_path / "y"}'], cwd=ROOT,
                        env=tfds_env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      'error: --active_fraction=0.3 is not one of the widths the run computes (0.25, 0.5, 0.75, '
      '1: 4 buckets).')
  assert not os.path.exists(tmp_path / 'y')
