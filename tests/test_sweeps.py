"""Sweep expansion: the ablation files' runs, their names, and overrides checked up front."""
import hashlib

from absl import flags
from ml_collections import config_flags
import pytest

from rag_jax import configuration
from rag_jax import errors
from rag_jax import sweeps
from tests.conftest import ROOT

ABLATIONS = ROOT / 'configs' / 'ablations'


def spec(name: str, arg: str = '') -> str:
  return f'{ABLATIONS / name}.py' + (f':{arg}' if arg else '')


def parse_like_train(config_spec: str, run_flags: list[str]):
  """The config rag_jax.train builds from `--config=FILE:ARG --config.F=V ...`."""
  argv = ['train', f'--config={config_spec}', *run_flags]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config.', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize('name,arg,count', [
    ('alpha_beta_lambda', '', 28), ('alpha_beta_lambda', 'smoke', 3),
    ('alpha_beta_lambda', 'gpu', 28), ('sites', '', 8), ('sites', 'smoke', 3),
    ('structure', '', 13), ('structure', 'smoke', 3), ('buckets', '', 8),
    ('buckets', 'smoke', 3), ('buckets', 'gpu', 9),
])
def test_every_ablation_expands_to_valid_unique_runs(name, arg, count):
  runs = sweeps.expand(spec(name, arg))
  assert len(runs) == count
  assert len({r.name for r in runs}) == count
  assert runs[0].overrides == sweeps.DENSE and not runs[0].random_activation
  assert all(r.random_activation for r in runs[1:])
  base = configuration.load_module(spec(name).partition(':')[0]).get_config(arg or None)
  small = {'': 4, 'smoke': 4, 'gpu': 6}[arg]
  assert base.model.num_heads == small
  for run in runs:
    configuration.validate(run.config)  # every override applied and valid
    for key, value in run.overrides.items():
      assert configuration.get(run.config, key) == value


def test_alpha_beta_lambda_grid():
  runs = sweeps.expand(spec('alpha_beta_lambda'))
  grid = {(r.config.activation.alpha, r.config.activation.beta, r.config.activation.lam)
          for r in runs[1:]}
  values = (0.5, 1.0, 2.0)
  assert grid == {(a, b, l) for a in values for b in values for l in (0.25, 0.5, 0.75)}
  assert not runs[0].config.activation.enabled  # the dense baseline


def test_names_are_stable_and_filesystem_safe():
  names = [r.name for r in sweeps.expand(spec('alpha_beta_lambda', 'smoke'))]
  assert names == ['enabled=False', 'alpha=0.5,beta=1,lam=0.5', 'alpha=2,beta=1,lam=0.5']
  assert [r.name for r in sweeps.expand(spec('sites'))][4] == 'sites=mlp+heads'
  # Order of keys and int-or-float do not change a name; the same key twice in a path does.
  assert sweeps.run_name({'activation.lam': 1, 'activation.alpha': 0.5}) == \
      sweeps.run_name({'activation.alpha': 0.5, 'activation.lam': 1.0}) == 'alpha=0.5,lam=1'
  assert sweeps.run_name({'a.x': 1, 'b.x': 2}) == 'a.x=1,b.x=2'
  assert sweeps.run_name({'data.paths': 'a/b c*.txt'}) == 'paths=a-b-c-.txt'
  assert sweeps.run_name({}) == 'base'
  long = {f'f{i}': 'v' * 20 for i in range(12)}
  other = dict(long, f11='w' * 20)
  assert len(sweeps.run_name(long)) <= 120 and sweeps.run_name(long) != sweeps.run_name(other)


@pytest.mark.parametrize('name,arg', [('alpha_beta_lambda', 'smoke'), ('structure', ''),
                                      ('buckets', 'gpu')])
def test_flags_give_train_the_same_config(name, arg):
  """What rag_jax.train parses from --config=FILE:ARG --config.F=V is the run's config."""
  for run in sweeps.expand(spec(name, arg)):
    parsed = parse_like_train(spec(name, arg), run.flags())
    assert parsed.to_dict() == run.config.to_dict(), run.name


BASE = configuration.load_config(spec('alpha_beta_lambda'), 'smoke')


@pytest.mark.parametrize('overrides,message', [
    ({'activation.alhpa': 0.5}, 'the config has no field `activation.alhpa`'),
    ({'actvation.alpha': 0.5}, 'config has no field `actvation`'),
    ({'activation.alpha': '0.5'}, '`activation.alpha` is a float field .* gives str'),
    ({'activation.buckets': True}, '`activation.buckets` is a int field .* gives bool'),
    ({'activation.enabled': 0}, '`activation.enabled` is a bool field'),
    ({'activation': 1}, '`activation` is a group of fields'),
    ({'activation.alpha': 0.0}, r'config.activation.alpha must be > 0'),
    ({'activation.lam': 1.5}, r'config.activation.lam must be in \[0, 1\]'),
    ({'activation.sites': 'mlp,experts'}, r"unknown site\(s\) \['experts'\]"),
    ({'activation.buckets': 3}, 'buckets=3 does not divide config.model.mlp_dim'),
])
def test_bad_overrides_are_rejected_naming_the_run(overrides, message):
  sweep = [dict(sweeps.DENSE), overrides]
  with pytest.raises(errors.ConfigError, match=f'sweep entry 1 .*{message}'):
    sweeps.make_runs(BASE, sweep)


def test_bad_sweeps_are_rejected():
  with pytest.raises(errors.ConfigError, match="same name 'lam=0.5' as entry 0"):
    sweeps.make_runs(BASE, [{'activation.lam': 0.5}, {'activation.lam': 0.5}])
  with pytest.raises(errors.ConfigError, match='yields no runs'):
    sweeps.make_runs(BASE, [])
  with pytest.raises(errors.ConfigError, match='must yield dicts'):
    sweeps.make_runs(BASE, [('activation.lam', 0.5)])
  with pytest.raises(errors.ConfigError, match='has no sweep'):
    sweeps.expand(str(ROOT / 'configs' / 'shakespeare_char.py'))
  with pytest.raises(errors.ConfigError, match='does not exist'):
    sweeps.expand(spec('no_such_ablation'))


def test_buckets_on_the_gpu_model_divide_its_six_heads():
  runs = sweeps.expand(spec('buckets', 'gpu'))
  both = [r.config.activation.buckets for r in runs[1:] if r.config.activation.sites != 'mlp']
  assert both == [2, 3, 6]
  with pytest.raises(errors.ConfigError, match='buckets=4 does not divide'):
    sweeps.make_runs(configuration.load_config(spec('buckets'), 'gpu'), [{'activation.buckets': 4}])


def test_long_paths_are_named_by_a_digest():
  """A run that starts from another run's workdir (the capacity sweep's teacher path) would be
  named by that workdir's long name; a path over 40 characters is named by a digest instead."""
  parent = 'runs/capacity/buckets=4,enabled=False,head_dim=16,mlp_dim=256,num_heads=4,seed=0'
  digest = hashlib.sha1(parent.encode()).hexdigest()[:8]
  assert sweeps.run_name({'init_from': parent, 'seed': 1}) == f'init_from=path-{digest},seed=1'
  assert sweeps.run_name({'init_from': 'runs/a'}) == 'init_from=runs-a'
