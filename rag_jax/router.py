"""A learned width router: which tokens gain most from the full width over a narrow one.

The `adaptive` policy escalates a token from the nested width `a` to the full width when the
narrow pass's top-1 probability is low; experiments/adaptive_routing.py found that confidence
marks tokens hard for every width, not the tokens the full width helps. The router here is
trained to predict that help directly: for each position, from what the narrow pass has already
computed (its final hidden state after `ln_f`, and its logits' top-1 log-probability and
entropy), the gain `loss_narrow - loss_full` of running the full width instead, in nats. The
decision is causal: it reads only the narrow pass at that position, before the full pass is
paid for.

Post hoc: the RA model is frozen and only the router learns (a two-layer MLP on standardised
features, squared error), on positions of the training split. Its target is the expected gain
KL(p_full || p_narrow) (`losses.expected_gain`), not the realised one: the realised gain depends on
the next token, which the router cannot see, and is mostly noise to it. `fit` returns the
router as a dict of float32 arrays; `save`/`load` keep it in the workdir (ROUTER_FILE, with the
width it routes from).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rag_jax import activation
from rag_jax import files
from rag_jax import losses
from rag_jax import weights

ROUTER_FILE = 'router.safetensors'
SHARES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the saved table's shares


class Router:
  """A fitted router and the nested width it routes from, as `--policy=adaptive --router`
  uses it. Compared by identity (its arrays are not hashable; two loads are two routers)."""

  def __init__(self, params: dict[str, jax.Array], fraction: float,
               share_thresholds: dict[float, float] | None = None):
    self.params, self.fraction = params, float(fraction)
    # {share: the threshold at which that share of validation positions escalated}, if saved.
    self.share_thresholds = dict(sorted((share_thresholds or {}).items()))

  def threshold_for(self, share: float) -> float:
    """The threshold that escalates about `share` of the tokens: interpolated in the table
    fitted on validation positions (teacher-forced; decoding's share follows it closely, not
    exactly). ValueError when the router has no table or `share` is outside it."""
    shares = list(self.share_thresholds)
    if not shares:
      raise ValueError('this router was saved without escalation shares; refit it with '
                       'experiments/router.py --save, or give a threshold.')
    if not shares[0] <= share <= shares[-1]:
      raise ValueError(f'escalation share must be in [{shares[0]:g}, {shares[-1]:g}] (the '
                       f"router's table), got {share}.")
    return float(np.interp(share, shares, [self.share_thresholds[s] for s in shares]))

  def gain(self, hidden: jax.Array, logits: jax.Array) -> jax.Array:
    """The predicted gain of the full width for positions of the narrow pass."""
    return predict(self.params, features(hidden, logits))


def request_threshold(router: Router | None, threshold: float, share: float | None = None, *,
                      threshold_given: bool = False, share_name: str = 'escalation_share',
                      threshold_name: str = 'threshold') -> float:
  """Policy adaptive's threshold for a request (the command line's, evaluate's, the server's):
  `threshold`, or, given a target escalation `share`, the `router`'s threshold for it. One
  ValueError for a share without a router, a share beside a threshold the user gave
  (`threshold_given`), or a share outside the router's table. `share_name`, `threshold_name`:
  what the user calls them (a flag, a request field)."""
  if share is None:
    return threshold
  if router is None:
    raise ValueError(f'{share_name} needs a learned router (--router), which saves the '
                     f'thresholds of each share; the confidence rule takes {threshold_name}.')
  if threshold_given:
    raise ValueError(f'give {threshold_name} or {share_name}, not both.')
  if isinstance(share, bool) or not isinstance(share, (int, float)):
    raise ValueError(f'{share_name} must be a number, got {share!r}.')
  return router.threshold_for(float(share))


def apply_with_hidden(model, variables, tokens, **kwargs):
  """`model.apply(variables, tokens, **kwargs)`'s output and the final LayerNorm's output (the
  hidden state the router reads), float32."""
  out, state = model.apply(variables, tokens, **kwargs,
                           capture_intermediates=lambda module, name: module.name == 'ln_f')
  return out, state['intermediates']['ln_f']['__call__'][0].astype(jnp.float32)


def scorer(model, params, act, fraction: float):
  """A jitted function of a batch of windows (tokens_Bx(T+1)) giving, per position: the
  router's features (hidden state, top-1 log-probability, entropy of the narrow pass at
  `fraction`), the narrow loss, the full loss and the expected gain (`losses.expected_gain`)."""
  narrow = activation.make_plan(jax.random.key(0), act, model.cfg, fraction=fraction)

  @jax.jit
  def score(tokens):
    x, y = tokens[:, :-1], tokens[:, 1:]
    (logits, _), hidden = apply_with_hidden(model, {'params': params}, x, plan=narrow)
    full = model.apply({'params': params}, x)[0]
    return (features(hidden, logits), losses.token_losses(logits, y),
            losses.token_losses(full, y), losses.expected_gain(full, logits))
  return score


def features(hidden: jax.Array, logits: jax.Array) -> jax.Array:
  """[hidden state, top-1 log-probability, entropy] per position (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -(jnp.exp(logp) * logp).sum(-1)
  return jnp.concatenate([hidden, logp.max(-1)[..., None], entropy[..., None]], axis=-1)


def init(key: jax.Array, num_features: int, hidden: int, mean: np.ndarray,
         std: np.ndarray) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {'mean': jnp.asarray(mean, jnp.float32), 'std': jnp.asarray(std, jnp.float32),
          'w1': jax.random.normal(k1, (num_features, hidden)) / np.sqrt(num_features),
          'b1': jnp.zeros((hidden,)), 'w2': jax.random.normal(k2, (hidden,)) / np.sqrt(hidden),
          'b2': jnp.zeros(())}


def predict(router: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
  """The predicted gain of the full width (nats) for each position's features."""
  z = (feats - router['mean']) / router['std']
  return jax.nn.gelu(z @ router['w1'] + router['b1']) @ router['w2'] + router['b2']


def fit(feats: np.ndarray, gains: np.ndarray, *, hidden: int = 64, steps: int = 600,
        batch: int = 4096, learning_rate: float = 3e-3, seed: int = 0) -> tuple[dict, list]:
  """The router fitted to (features, gain) pairs by Adam on the squared error; returns it and
  the loss every 50 steps. Only the router's parameters learn."""
  if len(feats) != len(gains) or len(feats) < batch:
    raise ValueError(f'need at least {batch} positions with features and gains, got '
                     f'{len(feats)} and {len(gains)}.')
  mean, std = feats.mean(0), feats.std(0) + 1e-6
  key = jax.random.key(seed)
  router = init(key, feats.shape[1], hidden, mean, std)
  trained = ('w1', 'b1', 'w2', 'b2')
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)
  opt = tx.init({k: router[k] for k in trained})
  feats_j, gains_j = jnp.asarray(feats, jnp.float32), jnp.asarray(gains, jnp.float32)

  @jax.jit
  def step(router, opt, idx):
    def loss(p):
      return jnp.mean((predict({**router, **p}, feats_j[idx]) - gains_j[idx]) ** 2)
    value, grads = jax.value_and_grad(loss)({k: router[k] for k in trained})
    updates, opt = tx.update(grads, opt, {k: router[k] for k in trained})
    return {**router, **optax.apply_updates({k: router[k] for k in trained}, updates)}, opt, value

  rng, curve = np.random.default_rng(seed), []
  for i in range(steps):
    router, opt, value = step(router, opt, rng.integers(0, len(feats), batch))
    if i % 50 == 0 or i == steps - 1:
      curve.append((i, float(value)))
  return router, curve


def escalate(scores: np.ndarray, share: float) -> np.ndarray:
  """The positions to run at the full width: the `share` with the highest scores (ties by
  position), as a boolean mask."""
  s = np.ravel(scores)
  chosen = np.zeros(s.size, bool)
  chosen[np.argsort(-s, kind='stable')[:int(round(share * s.size))]] = True
  return chosen


def share_thresholds(predicted: np.ndarray, shares=SHARES) -> dict[float, float]:
  """{share: the threshold above which that share of `predicted` gains lies}: halfway between
  the lowest score `escalate` picks at that share and the highest it leaves, so that `> threshold`
  (decoding's rule) picks the same positions as `escalate` (the evaluation's) on these scores."""
  s = np.sort(np.ravel(predicted).astype(np.float64))[::-1]
  table = {}
  for share in shares:
    k = min(max(int(round(share * s.size)), 1), s.size - 1)
    table[float(share)] = float((s[k - 1] + s[k]) / 2)
  return table


def save(workdir: str, router: dict[str, Any], fraction: float,
         thresholds: dict[float, float] | None = None) -> str:
  """Writes the router, the width it routes from and (optionally) its table of thresholds per
  escalation share (`share_thresholds`) into `workdir` (ROUTER_FILE)."""
  path = os.path.join(workdir, ROUTER_FILE)
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in router.items()}
  tensors['draft_fraction'] = np.array([fraction], np.float32)
  if thresholds:
    tensors['shares'] = np.asarray(list(thresholds), np.float32)
    tensors['share_thresholds'] = np.asarray(list(thresholds.values()), np.float32)
  weights.write_tensors(path, tensors, {'format': 'rag_jax router'})
  return path


def load(workdir: str) -> Router:
  """The router saved in `workdir` (experiments/router.py --save), or a ValueError saying how to
  make one."""
  path = os.path.join(workdir, ROUTER_FILE)
  if not files.exists(path):
    raise ValueError(f'{workdir} holds no router ({ROUTER_FILE}); fit one with python '
                     f'experiments/router.py --workdir={workdir} --save --out=router.json.')
  refit = f'refit it with python experiments/router.py --workdir={workdir} --save --out=router.json'
  try:
    tensors = weights.read_tensors(path)
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own kinds)
    raise ValueError(f'{path} is not a readable router file ({type(e).__name__}); {refit}.'
                     ) from None
  shapes = {k: np.shape(v) for k, v in tensors.items()}
  F, H = shapes.get('w1', (0, 0)) if len(shapes.get('w1', ())) == 2 else (0, 0)
  want = {'mean': (F,), 'std': (F,), 'w1': (F, H), 'b1': (H,), 'w2': (H,), 'b2': (1,),
          'draft_fraction': (1,)}  # (save writes a scalar as one element)
  if not F or any(shapes.get(k) != v for k, v in want.items()):
    raise ValueError(f'{path} is not a rag_jax router (tensors {shapes}); {refit}.')
  try:  # the run's config.json (not workdir.load_config: the decoders import no workdir code)
    D = int(files.read_json(os.path.join(workdir, 'config.json'))['model']['embed_dim'])
  except Exception:  # pylint: disable=broad-except  (loading the run itself names that problem)
    D = None
  if D is not None and F != D + 2:
    raise ValueError(f'the router in {workdir} reads {F} features, but this run gives {D + 2} '
                     f'(its {D}-wide final hidden state, top-1 log-probability and entropy): a '
                     f'router fitted on another run; {refit}.')
  fraction = float(tensors.pop('draft_fraction')[0])
  shares, thresholds = tensors.pop('shares', ()), tensors.pop('share_thresholds', ())
  tensors['b2'] = tensors['b2'].reshape(())
  return Router({k: jnp.asarray(v) for k, v in tensors.items()}, fraction,
                {float(s): float(t) for s, t in zip(shares, thresholds)})
