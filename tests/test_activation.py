"""The random activation means what it says (docs/design.md §1-§3)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from rag_jax import activation
from rag_jax import errors
from rag_jax import evaluate
from rag_jax import flops
from rag_jax import plan as plan_lib
from rag_jax.models import gpt
from rag_jax.models import widths

CFG = gpt.GPTConfig(vocab_size=33, num_layers=3, num_heads=4, embed_dim=32, mlp_dim=64,
                    block_size=16)


def act_config(**overrides):
  act = activation.default_config()
  act.enabled, act.lam = True, 1.0
  act.update(overrides)
  return act


@pytest.fixture(scope='module')
def model_params():
  model = gpt.GPT(CFG)
  tokens = jax.random.randint(jax.random.key(0), (2, CFG.block_size), 0, CFG.vocab_size)
  params = model.init(jax.random.key(1), tokens)['params']
  return model, params, tokens


def apply(model, params, tokens, plan):
  return jax.jit(lambda p, t, plan: model.apply({'params': p}, t, plan=plan)[0])(
      params, tokens, plan)


@pytest.mark.parametrize('alpha,beta,lam', [(1.0, 1.0, 0.75), (0.5, 0.5, 0.5), (2.0, 5.0, 1.0)])
def test_draws_follow_scaled_beta(alpha, beta, lam):
  act = act_config(alpha=alpha, beta=beta, lam=lam)
  a = np.asarray(activation.draw_fraction(jax.random.key(0), act, (20000,)))
  assert a.min() >= 1 - lam - 1e-6 and a.max() <= 1.0
  b = (1.0 - a) / lam
  assert scipy.stats.kstest(b, scipy.stats.beta(alpha, beta).cdf).pvalue > 1e-3
  assert abs((1 - a).mean() - lam * alpha / (alpha + beta)) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize('alpha,beta,lam,min_active', [(1.0, 1.0, 0.75, 0.0), (0.5, 2.0, 1.0, 0.3)])
def test_drawn_widths_follow_the_rounded_distribution(alpha, beta, lam, min_active):
  """Plans draw widths from static tables (width_cdf) instead of Beta variates; the widths must
  be distributed as draw_fraction's draws rounded up to buckets (and to whole layers)."""
  act = act_config(alpha=alpha, beta=beta, lam=lam, min_active=min_active, buckets=8,
                   sites='mlp,layers', per_layer=False)
  cfg = gpt.GPTConfig(**{**CFG.__dict__, 'num_layers': 5})
  keys = jax.random.split(jax.random.key(0), 8000)
  plans = jax.vmap(lambda k: activation.make_plan(k, act, cfg))(keys)
  got_mlp = np.bincount(np.asarray(plans[0].mlp.bucket), minlength=8) / len(keys)
  got_layers = np.bincount(sum(np.asarray(l.block.on, int) for l in plans) - 1,
                           minlength=5) / len(keys)
  a = activation.draw_fraction(jax.random.key(1), act, (8000,))
  want_mlp = np.bincount(np.asarray(activation.bucket_index(a, 8)), minlength=8) / len(keys)
  want_layers = np.bincount(np.asarray(activation.num_layers_on(a, 5)) - 1, minlength=5) / len(keys)
  np.testing.assert_allclose(got_mlp, want_mlp, atol=0.02)
  np.testing.assert_allclose(got_layers, want_layers, atol=0.02)
  np.testing.assert_allclose(got_mlp, np.diff(activation.width_cdf(act, 8), prepend=0), atol=0.02)


@pytest.mark.slow
def test_lam_zero_is_always_dense():
  act = act_config(lam=0.0, alpha=0.3, beta=0.3)
  a = activation.draw_fraction(jax.random.key(0), act, (5000,))
  assert np.all(np.asarray(a) == 1.0)
  plan = activation.make_plan(jax.random.key(3), act, CFG)
  assert all(int(layer.mlp.bucket) == act.buckets - 1 for layer in plan)


def test_min_active_floors_the_fraction():
  act = act_config(min_active=0.6)
  a = np.asarray(activation.draw_fraction(jax.random.key(0), act, (5000,)))
  assert a.min() == pytest.approx(0.6)


@pytest.mark.parametrize('a,bucket', [(1.0, 3), (0.76, 3), (0.75, 2), (0.5, 1), (0.26, 1),
                                      (0.25, 0), (0.01, 0), (0.0, 0)])
def test_bucket_rounds_up(a, bucket):
  assert activation.bucket_index(a, 4) == bucket
  assert int(activation.bucket_index(jnp.float32(a), 4)) == bucket


@pytest.mark.slow
def test_same_key_same_units_other_key_other_units():
  act = act_config(structure='random')
  p1 = activation.make_plan(jax.random.key(7), act, CFG)
  p2 = activation.make_plan(jax.random.key(7), act, CFG)
  p3 = activation.make_plan(jax.random.key(8), act, CFG)
  for l in range(CFG.num_layers):
    np.testing.assert_array_equal(p1[l].mlp.to_mask(), p2[l].mlp.to_mask())
  assert any(not np.array_equal(p1[l].mlp.perm, p3[l].mlp.perm) for l in range(3))
  assert not all(int(p1[l].mlp.bucket) == int(p3[l].mlp.bucket) for l in range(3)) or \
      any(not np.array_equal(p1[l].heads.to_mask(), p3[l].heads.to_mask()) for l in range(3))


def test_per_layer_draws_differ_across_layers():
  act = act_config(buckets=16, sites='mlp')
  act16 = act
  cfg = gpt.GPTConfig(**{**CFG.__dict__, 'num_layers': 6})
  buckets = [int(l.mlp.bucket) for l in activation.make_plan(jax.random.key(1), act16, cfg)]
  assert len(set(buckets)) > 1
  act.per_layer = False
  buckets = [int(l.mlp.bucket) for l in activation.make_plan(jax.random.key(1), act16, cfg)]
  assert len(set(buckets)) == 1


def _partial(plan):
  return any(int(l.mlp.bucket) < 3 for l in plan if l.mlp is not None)


@pytest.mark.slow
@pytest.mark.parametrize('structure', ['nested', 'random'])
@pytest.mark.parametrize('sites', ['mlp', 'heads', 'layers', 'mlp,heads,layers'])
@pytest.mark.parametrize('rescale', [False, True])
def test_switch_equals_mask_reference(model_params, structure, sites, rescale):
  """Computing only the active units (lax.switch over buckets) equals masking the same units."""
  model, params, tokens = model_params
  act = act_config(structure=structure, sites=sites, rescale=rescale)
  for seed in range(3):
    plan = activation.make_plan(jax.random.key(seed), act, CFG)
    got = apply(model, params, tokens, plan)
    want = apply(model, params, tokens, plan_lib.as_masks(plan))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  dense = apply(model, params, tokens, None)
  assert not np.allclose(got, dense, atol=1e-3)  # something was switched off


@pytest.mark.slow
@pytest.mark.parametrize('structure', ['nested', 'random'])
def test_switch_gradients_equal_mask_reference(model_params, structure):
  """The backward pass of the drawn widths (switch.switch, which keeps only the taken branch's
  residuals) gives the gradients of the mask reference on the same units."""
  model, params, tokens = model_params
  act = act_config(structure=structure, sites='mlp,heads,layers')

  @functools.partial(jax.jit, static_argnums=2)
  def grads(p, key, masks):
    plan = activation.make_plan(key, act, CFG)
    plan = plan_lib.as_masks(plan) if masks else plan
    return jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, tokens, plan=plan)[0])))(p)

  for seed in range(2):
    key = jax.random.key(seed)
    got, want = grads(params, key, False), grads(params, key, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got, want)


def test_switch_keeps_the_fused_attention_forward_rather_than_running_it_again(monkeypatch):
  """Under the drawn widths' backward pass, cuDNN's flash-attention forward runs once, not
  twice: its outputs (with the softmax statistics its backward reads) stay with the branch's
  residuals (switch._policy). Traced, not run: the model's cuDNN attention on this CPU with
  JAX's version checks patched (private names: skipped if they move)."""
  from rag_jax.models import switch
  fa = pytest.importorskip('jax._src.cudnn.fused_attention_stablehlo')
  if not all(hasattr(fa, n) for n in ('check_cudnn_version', 'check_compute_capability')):
    pytest.skip('JAX moved its cuDNN version checks')
  monkeypatch.setattr(fa, 'check_cudnn_version', lambda *a, **k: 91000)
  monkeypatch.setattr(fa, 'check_compute_capability', lambda *a, **k: True)
  cfg = gpt.GPTConfig(vocab_size=33, num_layers=1, num_heads=4, embed_dim=256, mlp_dim=64,
                      block_size=128, dtype=jnp.bfloat16, attention='cudnn')
  model, tokens = gpt.GPT(cfg), jnp.zeros((1, 128), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))['params']
  plan = activation.make_plan(jax.random.key(0), act_config(sites='heads', buckets=4), cfg)
  assert isinstance(plan[0].heads, plan_lib.DrawnWidth)

  def count_kernels():
    loss = lambda p: model.apply({'params': p}, tokens, plan=plan)[0].astype(jnp.float32).sum()
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    return (len(re.findall(r'dot_product_attention_fwd\w*\[', text)),
            len(re.findall(r'dot_product_attention_bwd\w*\[', text)))

  assert count_kernels() == (4, 4)  # one forward and one backward per width (4 branches)
  monkeypatch.setattr(switch, '_policy', switch._NAMED)  # names only: the forward runs again
  assert count_kernels() == (8, 4)


@pytest.mark.parametrize('structure', ['nested', 'random'])
@pytest.mark.parametrize('fraction', [0.25, 0.5, 0.75])
def test_static_width_equals_mask_reference(model_params, structure, fraction):
  model, params, tokens = model_params
  act = act_config(structure=structure, sites='mlp,heads,layers')
  plan = activation.make_plan(jax.random.key(0), act, CFG, fraction=fraction)
  assert isinstance(plan[0].mlp.bucket, int)
  assert all(isinstance(l.mlp, plan_lib.StaticWidth) for l in plan)
  np.testing.assert_allclose(apply(model, params, tokens, plan),
                             apply(model, params, tokens, plan_lib.as_masks(plan)),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('structure', ['nested', 'random', 'bernoulli'])
def test_fraction_one_equals_dense(model_params, structure):
  model, params, tokens = model_params
  act = act_config(structure=structure, sites='mlp,heads,layers')
  plan = activation.make_plan(jax.random.key(0), act, CFG, fraction=1.0)
  np.testing.assert_allclose(apply(model, params, tokens, plan),
                             apply(model, params, tokens, None), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('plan_kind,layout', [
    (kind, 'prefixes') for kind in ('dense', 'static', 'drawn', 'masks')] + [
    ('static', 'one_width')])
def test_decode_layout_equals_parameters(model_params, plan_kind, layout):
  """widths.decode_variables (switched weights as separate prefix arrays for decode loops:
  every width, or the one static width of the sites in the plan) computes what the parameters
  compute."""
  model, params, tokens = model_params
  act = act_config(sites='heads,layers' if layout == 'one_width' else 'mlp,heads,layers')
  key = jax.random.key(3)
  plan = {'dense': None,
          'static': activation.make_plan(key, act, CFG, fraction=0.5),
          'drawn': activation.make_plan(key, act, CFG),
          'masks': activation.per_position_plan(key, act, CFG, CFG.block_size)}[plan_kind]
  kept = {'prefixes': range(act.buckets),
          'one_width': [activation.bucket_index(0.5, act.buckets)]}[layout]
  variables = widths.decode_variables(params, act.buckets, kept, activation.parse_sites(act.sites))
  mlp_moved = 'w_in' not in variables['params']['block_0']['mlp']
  assert mlp_moved == (layout != 'one_width')
  query = variables['decode']['block_0']['attn']['query']
  assert isinstance(query, widths.Prefixes)
  assert len(query.arrays) == (1 if layout == 'one_width' else act.buckets)
  # The plan is closed over, as the sampler makes it: static widths stay Python ints.
  got = jax.jit(lambda v, t: model.apply(v, t, plan=plan)[0])(variables, tokens)
  np.testing.assert_allclose(got, apply(model, params, tokens, plan), atol=1e-5, rtol=1e-5)


def test_decode_layout_refuses_widths_it_does_not_hold(model_params):
  """A layout cut for one width says so when a plan asks it for another."""
  model, params, tokens = model_params
  act = act_config(sites='mlp')
  variables = widths.decode_variables(params, act.buckets, [1], ('mlp',))
  plan = activation.make_plan(jax.random.key(0), act, CFG, fraction=1.0)
  with pytest.raises(ValueError, match=r'holds widths \[32\], not 64'):
    model.apply(variables, tokens, plan=plan)


@pytest.mark.slow
def test_drawn_layers_with_dropout_train():
  """A drawn `layers` site (nn.cond over blocks) with dropout on, under jax.grad."""
  cfg = gpt.GPTConfig(**{**CFG.__dict__, 'dropout': 0.1})
  model = gpt.GPT(cfg)
  tokens = jnp.zeros((2, cfg.block_size), jnp.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  act = act_config(sites='mlp,heads,layers')

  @jax.jit
  def loss(p, key):
    plan = activation.make_plan(key, act, cfg)
    logits, _ = model.apply({'params': p}, tokens, deterministic=False, plan=plan,
                            rngs={'dropout': key})
    return logits.sum()

  grads = jax.grad(loss)(params, jax.random.key(1))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_bernoulli_keeps_each_unit_with_probability_a():
  act = act_config(structure='bernoulli', sites='mlp')
  cfg = gpt.GPTConfig(**{**CFG.__dict__, 'mlp_dim': 4096})
  masks = [l.mlp.mask for l in activation.make_plan(jax.random.key(0), act, cfg, fraction=0.3)]
  assert abs(float(jnp.mean(jnp.stack(masks))) - 0.3) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize('structure', ['nested', 'random'])
def test_gradients_reach_only_active_units(model_params, structure):
  model, params, tokens = model_params
  act = act_config(structure=structure, sites='mlp,heads')
  plan = activation.make_plan(jax.random.key(0), act, CFG, fraction=0.5)

  def loss(p):
    return model.apply({'params': p}, tokens, plan=plan)[0].sum()

  grads = jax.grad(loss)(params)
  for l in range(CFG.num_layers):
    mlp_on = np.asarray(plan[l].mlp.to_mask()) > 0
    heads_on = np.asarray(plan[l].heads.to_mask()) > 0
    g = grads[f'block_{l}']
    assert np.all(np.abs(g['mlp']['w_in'])[:, mlp_on].sum(0) > 0)
    assert np.all(g['mlp']['w_in'][:, ~mlp_on] == 0)
    assert np.all(g['mlp']['w_out'][~mlp_on] == 0)
    assert np.all(g['attn']['query'][:, heads_on].reshape(-1) != 0)
    assert np.all(g['attn']['query'][:, ~heads_on] == 0)
    # Keys and values are computed for every head (for the cache), but only the active heads'
    # attention reads them.
    assert np.all(g['attn']['key_value'][:, :, heads_on] != 0)
    assert np.all(g['attn']['key_value'][:, :, ~heads_on] == 0)
    assert np.all(g['attn']['out'][~heads_on] == 0)


DEFAULT = gpt.GPTConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512,
                        block_size=64)


@pytest.mark.slow
@pytest.mark.parametrize('sites', ['mlp,heads', 'mlp,heads,layers'])
def test_flops_fall_with_the_fraction_and_match_xla(sites):
  """XLA's cost analysis of the compiled static-width forward pass falls strictly with the
  fraction and agrees with the analytic count within 5%."""
  model = gpt.GPT(DEFAULT)
  tokens = jnp.zeros((1, DEFAULT.block_size), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)['params'])
  act = act_config(sites=sites)
  xla = []
  for a in (1.0, 0.75, 0.5, 0.25):
    plan = activation.make_plan(jax.random.key(0), act, DEFAULT, fraction=a)
    compiled = jax.jit(lambda p, t: model.apply({'params': p}, t, plan=plan)[0]).lower(
        params, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla.append(cost['flops'] / DEFAULT.block_size)
    analytic = flops.flops_per_token(DEFAULT, **activation.compute_fractions(act, DEFAULT, a))
    assert abs(xla[-1] - analytic) / analytic < 0.05, (a, xla[-1], analytic)
  assert all(x > y for x, y in zip(xla, xla[1:])), xla


@pytest.mark.slow
@pytest.mark.parametrize('structure', ['nested', 'random'])
def test_kv_cache_decode_at_fixed_fraction_equals_full_forward(model_params, structure):
  model, params, tokens = model_params
  act = act_config(structure=structure, sites='mlp,heads,layers')
  plan = activation.make_plan(jax.random.key(0), act, CFG, fraction=0.5)
  full = apply(model, params, tokens, plan)
  step = jax.jit(lambda p, x, c, pos: model.apply({'params': p}, x, cache=c, pos=pos, plan=plan))
  logits, cache = model.apply({'params': params}, tokens[:, :3], cache=gpt.init_cache(CFG, 2),
                              pos=0, plan=plan)
  outs = [logits]
  for t in range(3, CFG.block_size):
    logits, cache = step(params, tokens[:, t:t + 1], cache, t)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('structure', ['nested', 'random'])
def test_random_policy_parallel_pass_equals_token_by_token_draws(model_params, structure):
  """The evaluation of the `random` policy (per-position masks in one pass) scores exactly what
  decoding with a fresh drawn width at every position computes (lax.switch, KV cache)."""
  model, params, tokens = model_params
  act = act_config(structure=structure, sites='mlp,heads,layers')
  key = jax.random.key(5)
  parallel = apply(model, params, tokens,
                   activation.per_position_plan(key, act, CFG, CFG.block_size))

  @jax.jit
  def step(p, x, c, pos):
    plan = activation.make_plan(jax.random.fold_in(key, pos), act, CFG)
    return model.apply({'params': p}, x, cache=c, pos=pos, plan=plan)

  cache, outs = gpt.init_cache(CFG, 2), []
  for t in range(CFG.block_size):
    logits, cache = step(params, tokens[:, t:t + 1], cache, t)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), parallel, atol=1e-5, rtol=1e-5)


def test_expected_compute_under_random_policy():
  act = act_config(lam=0.5, sites='mlp')  # a ~ U[0.5, 1]; buckets of 4 round up to 0.75 or 1
  fr = activation.compute_fractions(act, CFG)
  assert fr['heads'] == 1.0 and fr['layers'] == 1.0
  assert abs(fr['mlp'] - (0.5 * 0.75 + 0.5 * 1.0)) < 0.02


@pytest.mark.parametrize('field,value,message', [
    ('alpha', 0.0, 'alpha must be > 0'),
    ('beta', -1.0, 'beta must be > 0'),
    ('lam', 1.5, r'lam must be in \[0, 1\]'),
    ('sites', 'mlp,neurons', r"unknown site\(s\) \['neurons'\]"),
    ('structure', 'topk', 'structure must be one of'),
    ('buckets', 3, 'buckets=3 does not divide config.model.mlp_dim=64'),
    ('train_mode', 'both', 'train_mode must be one of'),
    ('layer_schedule', 'late', 'layer_schedule must be one of'),
])
def test_validation_messages(field, value, message):
  import ml_collections
  act = act_config()
  with act.ignore_type():
    act[field] = value
  model = ml_collections.ConfigDict({'mlp_dim': 64, 'num_heads': 4})
  with pytest.raises(errors.ConfigError, match=message):
    activation.validate(act, model)


def test_layer_schedule_refuses_bernoulli():
  import ml_collections
  act = act_config(structure='bernoulli', sites='layers', layer_schedule='rising')
  model = ml_collections.ConfigDict({'mlp_dim': 64, 'num_heads': 4})
  with pytest.raises(errors.ConfigError, match="structure='bernoulli' gates every block"):
    activation.validate(act, model)


@pytest.mark.parametrize('num_layers', [1, 2, 4, 5, 8, 12])
def test_spaced_layers_are_evenly_spaced_with_both_ends(num_layers):
  for k in range(1, num_layers + 1):
    kept = activation.spaced_layers(k, num_layers)
    assert len(set(kept)) == k and list(kept) == sorted(kept) and kept[0] == 0
    if k > 1:
      assert kept[-1] == num_layers - 1
      gaps = np.diff(kept)
      assert gaps.max() - gaps.min() <= 1  # as even as whole blocks allow
  assert activation.spaced_layers(2, 4) == (0, 3) and activation.spaced_layers(3, 4) == (0, 2, 3)


@pytest.mark.parametrize('schedule,kept_at', [
    ('spaced', {0.5: (0, 3), 0.75: (0, 2, 3), 0.25: (0,)}),
    ('rising', {0.5: (0, 1), 0.75: (0, 1, 2), 0.25: (0,)})])
def test_layer_schedules_fixed_fraction_blocks(model_params, schedule, kept_at):
  """A fixed fraction keeps ceil(a L) blocks, evenly spaced (`spaced`) or the first ones
  (`rising`), statically, and the model skips exactly those (equal to gating the same blocks
  with masks)."""
  model, params, tokens = model_params
  cfg = gpt.GPTConfig(**{**CFG.__dict__, 'num_layers': 4})
  act = act_config(sites='layers', layer_schedule=schedule)
  for fraction, kept in kept_at.items():
    plan = activation.make_plan(jax.random.key(0), act, cfg, fraction=fraction)
    assert all(isinstance(l.block, plan_lib.StaticBlock) for l in plan)
    assert tuple(i for i, l in enumerate(plan) if l.block.on) == kept
  model4 = gpt.GPT(cfg)
  params4 = model4.init(jax.random.key(1), tokens)['params']
  plan = activation.make_plan(jax.random.key(0), act, cfg, fraction=0.5)
  np.testing.assert_allclose(apply(model4, params4, tokens, plan),
                             apply(model4, params4, tokens, plan_lib.as_masks(plan)),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_rising_schedule_drops_deeper_blocks_more():
  """Drawn under `rising`, the number of blocks kept is distributed as under any schedule; the
  first block is always kept, and each deeper block is dropped more often; `spaced` drops
  uniformly (the first block as often as the others)."""
  cfg = gpt.GPTConfig(**{**CFG.__dict__, 'num_layers': 6})
  keys = jax.random.split(jax.random.key(0), 6000)
  kept = {}
  for schedule in ('structure', 'spaced', 'rising'):
    act = act_config(sites='layers', lam=0.75, layer_schedule=schedule, structure='random')
    plans = jax.jit(jax.vmap(lambda k: activation.make_plan(k, act, cfg)))(keys)
    kept[schedule] = np.stack([np.asarray(l.block.on) for l in plans], axis=1)
  counts = {s: np.bincount(v.sum(1), minlength=7) / len(keys) for s, v in kept.items()}
  np.testing.assert_allclose(counts['rising'], counts['structure'], atol=0.02)
  np.testing.assert_allclose(counts['spaced'], counts['structure'], atol=0.02)
  rate = kept['rising'].mean(0)
  assert rate[0] == 1.0 and np.all(np.diff(rate) < -0.02), rate
  uniform = kept['spaced'].mean(0)
  assert uniform.max() - uniform.min() < 0.04, uniform


@pytest.mark.slow
def test_evaluation_random_policy_draws_per_row(model_params):
  """evaluate's `random` policy gives every row of a batch its own per-position draws ([B, L]
  masks, every site, layers included): row b scores what per_position_plan with row b's key
  gives that row alone."""
  model, params, tokens = model_params
  act = act_config(sites='mlp,heads,layers')
  key = jax.random.key(7)
  plan = evaluate.plan_fn(act, CFG, 'random')(key, (tokens.shape[0], tokens.shape[1] + 1))
  assert plan[0].block.mask.shape == tokens.shape
  batched = apply(model, params, tokens, plan)
  for b, row_key in enumerate(jax.random.split(key, tokens.shape[0])):
    alone = apply(model, params, tokens[b:b + 1],
                  activation.per_position_plan(row_key, act, CFG, tokens.shape[1]))
    np.testing.assert_allclose(batched[b:b + 1], alone, atol=1e-5, rtol=1e-5)


def test_is_random_reads_a_config_dict_and_a_config_json_alike():
  """One rule for 'this run draws its width' (train, sweeps, collect, the capacity report):
  enabled with lam > 0; a JSON dict reads as its ConfigDict; no activation config is dense."""
  assert activation.is_random(act_config())
  assert not activation.is_random(act_config(lam=0.0))
  assert not activation.is_random(act_config(enabled=False))
  assert not activation.is_random(None)
  for act in (act_config(), act_config(lam=0.0), act_config(enabled=False)):
    assert activation.is_random(act.to_dict()) == activation.is_random(act)
  # A run with warm-up counts its warm-up only when it draws (train_passes and the run's FLOPs).
  dense = act_config(enabled=False, full_warmup_steps=30)
  assert activation.train_passes(dense) == [1.0]
  assert activation.run_train_flops_per_token(dense, CFG, 100) == pytest.approx(
      100 * flops.flops_per_token(CFG))
