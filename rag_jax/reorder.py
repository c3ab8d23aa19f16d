"""Reorder a dense model's MLP units and heads by importance, so that nested prefixes keep what
matters (DynaBERT's rewiring), without changing what the model computes.

Random activation's `nested` structure keeps the *first* k units and heads of a layer. A model
trained densely has no reason to hold its important units first; permuting each layer's units
(the columns of w_in and b_in with the rows of w_out) and heads (their query, key and value
columns with their rows of the output projection) is function-preserving, and putting the most
important first lets a truncated model, and random-activation fine-tuning from it, start from
the best prefix.

Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; DynaBERT, Hou et al.
2020): the expected first-order change of the loss when a unit is switched off, estimated as
E_x |dL(x)/dm|, the gradient of the loss of a window x with respect to a 0/1 gate m on the
unit's (or head's) output, taken at m = 1 and averaged over windows of the train split.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax import losses
from rag_jax import plan as plan_lib
from rag_jax.models import gpt


def importance(model: gpt.GPT, params: Any, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
  """{'mlp': [layers, F], 'heads': [layers, H]}: E over windows of |dL/d gate| at gates = 1.
  `batches`: windows of T + 1 tokens ([B, T + 1], as data.train_batch cuts them)."""
  cfg = model.cfg
  L, F, H = cfg.num_layers, cfg.mlp_dim, cfg.num_heads

  def window_loss(gates, tokens_T1):
    plan = tuple(plan_lib.LayerPlan(mlp=plan_lib.UnitMask(gates['mlp'][i], d=F),
                                    heads=plan_lib.UnitMask(gates['heads'][i], d=H))
                 for i in range(L))
    logits, _ = model.apply({'params': params}, tokens_T1[None, :-1], plan=plan)
    return losses.token_losses(logits, tokens_T1[None, 1:]).mean()

  ones = {'mlp': jnp.ones((L, F)), 'heads': jnp.ones((L, H))}
  per_window = jax.jit(jax.vmap(jax.grad(window_loss), in_axes=(None, 0)))
  total, count = jax.tree.map(np.zeros_like, ones), 0
  for batch in batches:
    grads = per_window(ones, jnp.asarray(batch, jnp.int32))
    total = jax.tree.map(lambda t, g: t + np.abs(np.asarray(g)).sum(0), total, grads)
    count += len(batch)
  return {k: v / max(count, 1) for k, v in total.items()}


def permute(params: Any, order: dict[str, np.ndarray]) -> dict:
  """`params` with layer i's MLP units in order `order['mlp'][i]` and its heads in order
  `order['heads'][i]` (unit order[j] becomes unit j): the same function. Arrays of any kind
  (host, device, traced under jit) come back as the same kind."""
  out = dict(params)
  for i, (units, heads) in enumerate(zip(order['mlp'], order['heads'])):
    out[f'block_{i}'] = gpt.take_units(out[f'block_{i}'], heads, units)
  return out


def permute_like_params(tree: Any, params: Any, order: dict[str, np.ndarray]) -> Any:
  """`tree` (an optimizer state) with every subtree shaped like `params` (Adam's moments)
  permuted as `permute` permutes the parameters; everything else (step counts) unchanged."""
  structure = jax.tree.structure(params)
  return jax.tree.map(
      lambda node: permute(node, order) if jax.tree.structure(node) == structure else node,
      tree, is_leaf=lambda node: jax.tree.structure(node) == structure)


def importance_order(model: gpt.GPT, params: Any, batches: Iterable[np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(every layer's units and heads, most important first: `permute`'s order, their importances
  in that order)."""
  scores = importance(model, params, batches)
  order = {k: np.argsort(-v, axis=1, kind='stable') for k, v in scores.items()}
  return order, {k: np.take_along_axis(v, order[k], 1) for k, v in scores.items()}


def by_importance(model: gpt.GPT, params: Any, batches: Iterable[np.ndarray]
                  ) -> tuple[dict, dict[str, np.ndarray]]:
  """(the parameters with every layer's units and heads most important first, the importances
  in the new order)."""
  order, scores = importance_order(model, params, batches)
  return permute(params, order), scores
