"""Training that closes the gap: in-place distillation and the sandwich rule (train.py), and the
training FLOPs each mode costs (activation.train_flops_per_token)."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rag_jax import activation
from rag_jax import configuration
from rag_jax.data import pipeline as data_lib
from rag_jax import flops
from rag_jax import losses
from rag_jax import plan as plan_lib
from rag_jax import reorder
from rag_jax import runs
from rag_jax import sharding
from rag_jax import train
from rag_jax.errors import ConfigError
from rag_jax.models import gpt
from tests.conftest import load_config

CFG = gpt.GPTConfig(vocab_size=29, num_layers=2, num_heads=4, embed_dim=16, mlp_dim=32,
                    block_size=8)


def act_config(**overrides):
  act = activation.default_config()
  act.update(enabled=True, lam=0.75, buckets=4, **overrides)
  return act


@pytest.fixture(scope='module')
def setup():
  model = gpt.GPT(CFG)
  tokens = jax.random.randint(jax.random.key(0), (2, CFG.block_size + 1), 0, CFG.vocab_size)
  params = model.init(jax.random.key(1), tokens[:, :-1])['params']
  tx = optax.adamw(1e-2)
  state = runs.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))
  return model, tx, state, tokens


@pytest.mark.slow
def test_narrow_loss_at_weight_zero_is_the_cross_entropy_and_the_target_has_no_gradient():
  student = jax.random.normal(jax.random.key(2), (2, 5, 7))
  teacher = jax.random.normal(jax.random.key(3), (2, 5, 7))
  tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, 7)
  objective, ce = train.narrow_loss(student, teacher, tokens, 0.0, 1.0)
  assert objective == ce == train.cross_entropy(student, tokens)
  f = lambda s, t: train.narrow_loss(s, t, tokens, 0.7, 2.0)[0]
  d_student, d_teacher = jax.grad(f, argnums=(0, 1))(student, teacher)
  assert float(jnp.abs(d_teacher).max()) == 0.0  # the target is detached
  assert float(jnp.abs(d_student).max()) > 0
  # With the student equal to the teacher the KL term is 0: the objective is (1 - w) * CE.
  same, ce = train.narrow_loss(teacher, teacher, tokens, 0.7, 2.0)
  np.testing.assert_allclose(same, 0.3 * ce, rtol=1e-5)


@pytest.mark.slow
def test_sandwich_with_distillation_weight_zero_equals_plain_sandwich(setup):
  """One step of `sandwich` with distill_weight = 0 gives exactly the parameters of a step
  written here by hand: the full width's and the drawn width's cross-entropies, summed. The
  two are separately compiled programs, whose fusions may round differently: equal within
  float32 rounding (run op by op, unjitted, they are bit for bit equal, but that takes minutes).
  A positive weight moves the parameters a thousand times further."""
  model, tx, state, tokens = setup
  act = act_config(train_mode='sandwich', distill_weight=0.0, per_layer=False)  # one width
  key = jax.random.key(5)
  new, metrics = jax.jit(train.make_train_step(model, tx, act))(state, tokens, key)

  # The drawn width, as the step reports it (nested widths: the fraction names the plan; no
  # copy of the step's key schedule here).
  drawn = float(metrics['active_mlp'])
  assert drawn < 1 and drawn == float(metrics['active_heads'])
  plan = activation.make_plan(jax.random.key(0), act, CFG, fraction=drawn)
  loss = lambda p: (train.loss_fn(p, model, tokens, None) +
                    train.loss_fn(p, model, tokens, None, plan))
  grads = jax.jit(jax.grad(loss))(state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  gap = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(jnp.abs(x - y).max()), a, b)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               new.params, expected)
  distilled, _ = jax.jit(train.make_train_step(
      model, tx, act_config(train_mode='sandwich', distill_weight=0.5)))(state, tokens, key)
  assert gap(distilled.params, expected) > 1e-4
  assert np.isfinite(float(metrics['train_loss_drawn']))


def test_sandwich_rule_widths_are_the_configured_ones():
  act = act_config(train_mode='sandwich_rule', sandwich_random=3)
  plans = train.train_plans(jax.random.key(6), act, CFG)
  assert len(plans) == 4
  smallest = plan_lib.active_fractions(plans[0])
  assert smallest['mlp'] == smallest['heads'] == 0.25  # 1 - lam, at 4 buckets
  assert all(isinstance(p.mlp, plan_lib.StaticWidth) for p in plans[0])
  assert all(isinstance(p.mlp, plan_lib.DrawnWidth) for plan in plans[1:] for p in plan)
  # The drawn widths use different keys: over many steps they are not all equal. (One draw for
  # all layers here, so that a plan's mean fraction is its width.)
  act.per_layer = False
  draws = np.array([[float(plan_lib.active_fractions(p)['mlp']) for p in
                     train.train_plans(jax.random.key(s), act, CFG)[1:]] for s in range(20)])
  assert (draws.std(axis=1) > 0).any()
  assert set(np.unique(draws)) <= {0.25, 0.5, 0.75, 1.0}
  assert len(train.train_plans(jax.random.key(6), act_config(train_mode='sandwich'), CFG)) == 1


@pytest.mark.slow
def test_sandwich_rule_step_trains(setup):
  model, tx, state, tokens = setup
  act = act_config(train_mode='sandwich_rule', sandwich_random=2, distill_weight=1.0)
  step = jax.jit(train.make_train_step(model, tx, act))
  losses = []
  for _ in range(10):
    state, metrics = step(state, tokens, jax.random.key(7))
    losses.append(float(metrics['train_loss']))
  assert losses[-1] < losses[0] - 0.3 and np.isfinite(float(metrics['train_loss_drawn']))


def test_training_flops_of_each_mode():
  full = flops.flops_per_token(CFG)
  mean = flops.flops_per_token(CFG, **activation.compute_fractions(act_config(), CFG))
  quarter = flops.flops_per_token(CFG, **activation.compute_fractions(act_config(), CFG, 0.25))
  assert activation.train_flops_per_token(act_config(), CFG) == mean
  assert activation.train_flops_per_token(act_config(train_mode='sandwich'), CFG) == full + mean
  rule = activation.train_flops_per_token(
      act_config(train_mode='sandwich_rule', sandwich_random=2), CFG)
  assert rule == pytest.approx(full + quarter + 2 * mean)
  mixed = activation.train_flops_per_token(
      act_config(train_mode='sandwich_rule', sandwich_random=2, mixed_share=0.3), CFG)
  assert mixed == pytest.approx(rule + full)  # the mixed pass computes every unit (masks)
  dense = activation.default_config()
  assert activation.train_flops_per_token(dense, CFG) == full
  assert quarter < mean < full


@pytest.mark.parametrize('overrides,match', [
    ({'distill_weight': 0.5}, 'train_mode'),  # single has no full width to distil from
    ({'train_mode': 'sandwich', 'distill_weight': 1.5}, 'distill_weight'),
    ({'train_mode': 'sandwich', 'distill_temperature': 0.0}, 'distill_temperature'),
    ({'train_mode': 'sandwich_rule', 'sandwich_random': -1}, 'sandwich_random'),
    ({'train_mode': 'sandwich_rules'}, 'train_mode'),
    ({'train_mode': 'sandwich', 'narrow_weight': 0.0}, 'narrow_weight must be a finite number'),
    ({'train_mode': 'sandwich', 'narrow_weight': float('nan')}, 'narrow_weight must be a finite'),
    ({'narrow_weight': 2.0}, 'narrow_weight weighs the narrow passes'),  # single: no full pass
    ({'train_mode': 'sandwich_rule', 'mixed_share': 1.0}, r'mixed_share must be in \[0, 1\)'),
    ({'train_mode': 'sandwich_rule', 'mixed_share': -0.1}, 'mixed_share must be in'),
    ({'train_mode': 'sandwich_rule', 'mixed_share': float('nan')}, 'mixed_share must be in'),
    ({'mixed_share': 0.3}, 'mixed_share adds a pass'),  # single: no full pass beside it
    ({'train_mode': 'sandwich_rule', 'mixed_share': 0.3, 'mixed_routing': 'oracle'},
     'mixed_routing must be one of random, gain'),
    ({'train_mode': 'sandwich_rule', 'mixed_routing': 'gain'}, 'needs a mixed pass'),
    ({'train_mode': 'sandwich', 'mixed_share': 0.3, 'mixed_routing': 'gain'},
     "smallest width's own pass"),
    ({'train_mode': 'sandwich_rule', 'warmup_reorder': True}, 'set full_warmup_steps > 0'),
    ({'train_mode': 'sandwich_rule', 'full_warmup_steps': 5, 'structure': 'random',
      'warmup_reorder': True}, "structure='nested'"),
])
def test_bad_training_modes_are_refused(overrides, match):
  model = CFG
  with pytest.raises(ConfigError, match=match):
    activation.validate(act_config(**overrides), model)


@pytest.mark.slow
def test_narrow_weight_scales_the_narrow_passes_gradient(setup):
  """With SGD at learning rate 1 a step's update is minus its gradient. The full width's gradient
  alone is the dense step's; `narrow_weight` w must give g_full + w * (g_sandwich - g_full)."""
  model, _, state, tokens = setup
  sgd = optax.sgd(1.0)
  state = runs.TrainState(step=state.step, params=state.params, opt_state=sgd.init(state.params))
  key = jax.random.key(9)

  def grads(act):
    new, _ = jax.jit(train.make_train_step(model, sgd, act))(state, tokens, key)
    return jax.tree.map(lambda a, b: a - b, state.params, new.params)

  full = grads(None)
  plain = grads(act_config(train_mode='sandwich'))
  double = grads(act_config(train_mode='sandwich', narrow_weight=2.0))
  for f, p, d in zip(jax.tree.leaves(full), jax.tree.leaves(plain), jax.tree.leaves(double)):
    np.testing.assert_allclose(d, f + 2.0 * (p - f), rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(p - f).max()) > 1e-6
             for f, p in zip(jax.tree.leaves(full), jax.tree.leaves(plain)))


@pytest.mark.slow
def test_full_width_warmup_trains_the_dense_model_first(setup):
  """With `full_warmup_steps` = k the first k steps are the dense step exactly (same updates,
  full-width metrics), the next one draws; the run's training FLOPs count k dense steps."""
  model, tx, state, tokens = setup
  key = jax.random.key(11)
  dense_step = jax.jit(train.make_train_step(model, tx, None))
  warm_step = jax.jit(train.make_train_step(
      model, tx, act_config(train_mode='sandwich_rule', full_warmup_steps=2)))
  plain_step = jax.jit(train.make_train_step(model, tx, act_config(train_mode='sandwich_rule')))
  dense, warm = state, state
  for _ in range(2):
    dense, _ = dense_step(dense, tokens, key)
    warm, metrics = warm_step(warm, tokens, key)
    for a, b in zip(jax.tree.leaves(dense.params), jax.tree.leaves(warm.params)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(metrics['active_mlp']) == 1.0
  # Step 3 draws: as a plain sandwich_rule step from the same state.
  after, metrics = warm_step(warm, tokens, key)
  expected, _ = plain_step(warm, tokens, key)
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(expected.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  dense_after, _ = dense_step(warm, tokens, key)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(after.params),
                                                     jax.tree.leaves(dense_after.params)))
  act = act_config(train_mode='sandwich_rule', full_warmup_steps=30)
  full = flops.flops_per_token(CFG)
  per_step = activation.train_flops_per_token(act, CFG)
  assert activation.run_train_flops_per_token(act, CFG, 100) == pytest.approx(
      30 * full + 70 * per_step)


def test_a_warmup_reorder_that_is_not_a_bool_is_refused():
  """As a config.json edited by hand gives it (a ConfigDict built from JSON takes any type)."""
  act = ml_collections.ConfigDict({**act_config(train_mode='sandwich_rule',
                                                full_warmup_steps=5).to_dict(),
                                   'warmup_reorder': 'yes'})
  with pytest.raises(ConfigError, match="warmup_reorder must be True or False, got 'yes'"):
    activation.validate(act, CFG)


@pytest.mark.slow
def test_warmup_reorder_permutes_parameters_and_moments_alike(tfds_dir, capsys, tmp_path):
  """At the warm-up's end `warmup_reorder` puts every layer's most important units and heads
  first and changes nothing else: the same function, and the next step from the reordered
  state is the next step from the old one, permuted (Adam's moments moved with their units).
  In a run it happens once, after step full_warmup_steps."""
  config = load_config('ra_shakespeare_char', 'smoke')
  config.data.data_dir = tfds_dir
  config.activation.update(train_mode='sandwich_rule', full_warmup_steps=2, warmup_reorder=True)
  configuration.validate(config)
  vocab = 65
  model, tx = runs.make_model(config, vocab), runs.make_optimizer(config)
  state = jax.jit(lambda key: runs.init_state(model, tx, key, config))(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, vocab, 4000).astype(np.int32)
  B, T = config.batch_size, config.model.block_size
  dense_step = jax.jit(train.make_train_step(model, tx, None))
  key = jax.random.key(3)
  for i in range(2):
    state, _ = dense_step(state, data_lib.train_batch(tokens, B, T, 0, i), key)
  dataset = types.SimpleNamespace(splits={'train': tokens})
  mesh = sharding.make_mesh(config)
  shard = sharding.Shardings.of(mesh, state, config.mesh.rules)
  with jax.set_mesh(mesh):
    new = train.warmup_reordered(state, model, dataset, config, shard)
  batches = train._reorder_batches(dataset, config)  # pylint: disable=protected-access
  order, _ = reorder.importance_order(model, jax.device_get(state.params), batches)
  assert any((o != np.arange(o.shape[-1])).any() for o in order.values())  # it did move units
  scores = reorder.importance(model, new.params, batches)
  assert all((np.diff(v, axis=1) <= 1e-6).all() for v in scores.values())
  x = jnp.asarray(batches[0][:, :-1])
  np.testing.assert_allclose(model.apply({'params': new.params}, x)[0],
                             model.apply({'params': state.params}, x)[0], rtol=1e-5, atol=1e-5)
  batch = data_lib.train_batch(tokens, B, T, 0, 2)
  after_old, _ = dense_step(state, batch, key)
  after_new, _ = dense_step(new, batch, key)
  expected = reorder.permute(jax.device_get(after_old.params), order)
  for a, b in zip(jax.tree.leaves(after_new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # In a run: once, after the warm-up's last step.
  capsys.readouterr()
  config.num_steps, config.eval_every, config.checkpoint_every = 4, 4, 4
  config.opt.warmup_steps = 1
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert capsys.readouterr().err.count('step 2: the full-width warm-up ends; reordered') == 1


@pytest.mark.parametrize('value', [-1, -20])
def test_bad_full_warmup_steps_are_refused(value):
  with pytest.raises(ConfigError, match='full_warmup_steps must be a non-negative integer'):
    activation.validate(act_config(full_warmup_steps=value), CFG)


def test_a_warmup_as_long_as_the_run_is_refused():
  config = load_config('ra_shakespeare_char', 'smoke')
  config.activation.full_warmup_steps = config.num_steps
  with pytest.raises(ConfigError, match=r'full_warmup_steps \(60\) must be smaller than '
                                        r'config.num_steps \(60\)'):
    configuration.validate(config)


def test_mixed_plan_escalates_a_share_of_positions_per_row():
  """The mixed pass: the smallest width's units, all units at the escalated (row, position)s,
  drawn with probability mixed_share per position and differently per row and per step key."""
  act = act_config(train_mode='sandwich_rule', mixed_share=0.3)
  plan = train.mixed_plan(jax.random.key(3), act, CFG, (64, CFG.block_size + 1))
  mask = np.asarray(plan[0].mlp.mask)  # [B, T, F]
  assert mask.shape == (64, CFG.block_size, CFG.mlp_dim)
  escalated = mask.min(axis=-1) == 1
  narrow = mask[~escalated]
  assert (narrow[:, :CFG.mlp_dim // 4] == 1).all() and (narrow[:, CFG.mlp_dim // 4:] == 0).all()
  assert 0.2 < escalated.mean() < 0.4 and len({r.tobytes() for r in escalated}) > 32
  heads = np.asarray(plan[1].heads.mask).min(axis=-1) == 1
  np.testing.assert_array_equal(heads, escalated)  # every site of a position: one width
  other = train.mixed_plan(jax.random.key(4), act, CFG, (64, CFG.block_size + 1))
  assert (np.asarray(other[0].mlp.mask).min(axis=-1) == 1).tolist() != escalated.tolist()


def test_gain_routing_escalates_each_rows_top_share():
  """mixed_routing='gain': in every row exactly round(share * T) positions run at the full width,
  those of largest gain, whatever the key."""
  act = act_config(train_mode='sandwich_rule', mixed_share=0.25, mixed_routing='gain')
  gain = jax.random.uniform(jax.random.key(5), (16, CFG.block_size))
  plan = train.mixed_plan(jax.random.key(3), act, CFG, (16, CFG.block_size + 1), gain)
  escalated = np.asarray(plan[0].mlp.mask).min(axis=-1) == 1
  top = np.argsort(-np.asarray(gain), axis=1)[:, :2]  # round(0.25 * 8) = 2 per row
  want = np.zeros_like(escalated)
  np.put_along_axis(want, top, True, axis=1)
  np.testing.assert_array_equal(escalated, want)
  again = train.mixed_plan(jax.random.key(4), act, CFG, (16, CFG.block_size + 1), gain)
  np.testing.assert_array_equal(np.asarray(again[0].mlp.mask), np.asarray(plan[0].mlp.mask))
  np.testing.assert_array_equal(train.top_share(jnp.zeros((2, 8)) + jnp.arange(8), 0.01),
                                np.arange(8)[None].repeat(2, 0) == 7)  # at least one


@pytest.mark.slow
def test_gain_routing_escalates_where_this_steps_full_width_gains_most(setup):
  """A step with mixed_routing='gain' adds the gradient of the mixed pass whose escalated
  positions are the top share of KL(full || smallest) of the step's own passes (SGD at rate 1:
  the update is minus the gradient), and differs from a step with random positions."""
  model, _, state, tokens = setup
  sgd = optax.sgd(1.0)
  state = runs.TrainState(step=state.step, params=state.params, opt_state=sgd.init(state.params))
  key = jax.random.key(12)
  rule = act_config(train_mode='sandwich_rule', distill_weight=0.5)
  routed = act_config(train_mode='sandwich_rule', distill_weight=0.5, mixed_share=0.25,
                      mixed_routing='gain')
  after_rule, _ = jax.jit(train.make_train_step(model, sgd, rule))(state, tokens, key)
  after_routed, _ = jax.jit(train.make_train_step(model, sgd, routed))(state, tokens, key)
  after_random, _ = jax.jit(train.make_train_step(
      model, sgd, act_config(train_mode='sandwich_rule', distill_weight=0.5,
                             mixed_share=0.25)))(state, tokens, key)
  _, act_key = jax.random.split(jax.random.fold_in(key, state.step))
  full = train.logits_fn(state.params, model, tokens, None)
  smallest = train.logits_fn(state.params, model, tokens, None,
                             train.train_plans(act_key, routed, CFG)[0])
  plan = train.mixed_plan(act_key, routed, CFG, tokens.shape, losses.expected_gain(full, smallest))
  grad = jax.grad(lambda p: train.narrow_loss(train.logits_fn(p, model, tokens, None, plan),
                                              full, tokens, 0.5, 1.0)[0])(state.params)
  for r, m, g in zip(jax.tree.leaves(after_rule.params), jax.tree.leaves(after_routed.params),
                     jax.tree.leaves(grad)):
    np.testing.assert_allclose(m, r - g, rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(after_routed.params),
                                                   jax.tree.leaves(after_random.params)))


@pytest.mark.slow
def test_mixed_share_adds_the_mixed_pass_to_the_objective(setup):
  """With SGD at learning rate 1 a step's update is minus its gradient: a step with mixed_share
  s moves the parameters by the sandwich rule's step plus narrow_weight times the mixed pass's
  gradient (distilled like the narrow ones, the full width a target only), same activation key."""
  model, _, state, tokens = setup
  sgd = optax.sgd(1.0)
  state = runs.TrainState(step=state.step, params=state.params, opt_state=sgd.init(state.params))
  key = jax.random.key(12)
  rule = act_config(train_mode='sandwich_rule', distill_weight=0.5, narrow_weight=2.0)
  mixed = act_config(train_mode='sandwich_rule', distill_weight=0.5, narrow_weight=2.0,
                     mixed_share=0.4)
  after_rule, _ = jax.jit(train.make_train_step(model, sgd, rule))(state, tokens, key)
  after_mixed, _ = jax.jit(train.make_train_step(model, sgd, mixed))(state, tokens, key)
  _, act_key = jax.random.split(jax.random.fold_in(key, state.step))
  plan = train.mixed_plan(act_key, mixed, CFG, tokens.shape)
  full = train.logits_fn(state.params, model, tokens, None)
  grad = jax.grad(lambda p: train.narrow_loss(train.logits_fn(p, model, tokens, None, plan),
                                              full, tokens, 0.5, 1.0)[0])(state.params)
  for r, m, g in zip(jax.tree.leaves(after_rule.params), jax.tree.leaves(after_mixed.params),
                     jax.tree.leaves(grad)):
    np.testing.assert_allclose(m, r - 2.0 * g, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) > 1e-4
