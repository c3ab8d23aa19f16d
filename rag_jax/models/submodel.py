"""A fixed nested width as the smaller dense model it is: the kept heads, MLP units and blocks
sliced from the parent (the sampler's fixed width, speculative drafts, `rag_jax.export`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from rag_jax import activation
from rag_jax import plan as plan_lib
from rag_jax.models import gpt


def kept_units(plan: plan_lib.Plan, cfg: gpt.GPTConfig) -> list[dict[str, Any]]:
  """Per kept block: its index, and how many heads and MLP units it keeps (nested: the first
  ones) with the scale their outputs carry (d/k with `rescale`, else 1)."""
  kept = []
  for i, layer in enumerate(plan):
    match layer.block:
      case None | plan_lib.StaticBlock(on=True):
        pass
      case plan_lib.StaticBlock(on=False):
        continue
      case _:
        raise ValueError('only a fixed plan exports (static widths and blocks).')
    entry = {'layer': i}
    for site, d in (('heads', cfg.heads_of(i)), ('mlp', cfg.mlp_dim_of(i))):
      s = getattr(layer, site)
      if s is None:
        entry[site], entry[f'{site}_scale'] = d, 1.0
      elif isinstance(s, plan_lib.StaticWidth) and s.perm is None:
        k = s.width(s.bucket)
        entry[site], entry[f'{site}_scale'] = k, s.scale(k)
      else:
        raise ValueError(f'the {site} of layer {i} are not a nested static width; only the '
                         'nested structure exports.')
    kept.append(entry)
  return kept


def slice_params(params: dict, cfg: gpt.GPTConfig, plan: plan_lib.Plan, to_numpy: bool = True
                 ) -> tuple[dict, dict[str, int], list[dict]]:
  """The sub-model of `plan`: (its parameters, its model fields, the kept units per block).
  A site's output scale is folded into its output projection, so the sub-model computes what
  the parent computes under `plan`. `to_numpy=False` keeps jax arrays (inside a jitted
  program: the sampler's fixed width)."""
  kept = kept_units(plan, cfg)
  arrays = (lambda tree: jax.tree.map(np.asarray, tree)) if to_numpy else (lambda tree: tree)
  out = {name: arrays(params[name]) for name in ('wte', 'wpe', 'ln_f')}
  for j, k in enumerate(kept):
    block = arrays(params[f'block_{k["layer"]}'])
    block = gpt.take_units(block, slice(0, k['heads']), slice(0, k['mlp']))  # nested: prefixes
    # The sites' output scales folded into their output projections (float32 like the params).
    attn = {**block['attn'], 'out': block['attn']['out'] * np.float32(k['heads_scale'])}
    mlp = {**block['mlp'], 'w_out': block['mlp']['w_out'] * np.float32(k['mlp_scale'])}
    out[f'block_{j}'] = {**block, 'attn': attn, 'mlp': mlp}
  heads, units = max(k['heads'] for k in kept), max(k['mlp'] for k in kept)
  model = {'num_layers': len(kept), 'num_heads': heads, 'head_dim': cfg.head_dim,
           'mlp_dim': units, 'layer_heads': (), 'layer_mlp_dims': ()}
  layer_heads, layer_mlp = tuple(k['heads'] for k in kept), tuple(k['mlp'] for k in kept)
  if len(set(zip(layer_heads, layer_mlp))) > 1:  # blocks of their own widths (a per-layer plan)
    model.update(layer_heads=layer_heads, layer_mlp_dims=layer_mlp)
  return out, model, [{'layer': k['layer'], 'heads': k['heads'], 'mlp_units': k['mlp']}
                      for k in kept]


def submodel(params, model: gpt.GPT, plan: plan_lib.Plan) -> tuple[dict, gpt.GPT]:
  """The dense model that computes what `model` computes under a fixed nested `plan`: only the
  kept heads (their queries, keys and values: a smaller KV cache), MLP units and blocks, sliced
  from jax arrays (inside a compiled program: the sampler's fixed width, speculative drafts)."""
  sub, fields, _ = slice_params(params, model.cfg, plan, to_numpy=False)
  return sub, gpt.GPT(dataclasses.replace(model.cfg, **fields))


def check_fraction(act: ml_collections.ConfigDict, cfg: gpt.GPTConfig, fraction: float,
                   flag: str = '--active_fraction') -> None:
  """A fraction exports when it is one of the widths the parent computes: a bucket of each
  width site, a whole number of blocks for `layers`. `flag` names the fraction in the messages
  (speculative decoding checks its draft width here too)."""
  if not 0 < fraction <= 1:
    raise ValueError(f'{flag} must be in (0, 1], got {fraction}.')
  sites = activation.parse_sites(act.sites)
  if act.structure != 'nested' and fraction < 1:
    raise ValueError(f"the run's activation structure is {act.structure!r}: its units are "
                     'chosen per batch from keys, so no one sub-model equals it; only nested '
                     'widths export.')
  # The parent rounds a fraction up to the width it computes; only those widths export.
  computed = activation.compute_fractions(act, cfg, fraction)
  off = [s for s in sites if abs(computed[s] - fraction) > 1e-6]
  if set(off) & {'mlp', 'heads'}:
    widths = ', '.join(f'{j / act.buckets:g}' for j in range(1, act.buckets + 1))
    raise ValueError(f'{flag}={fraction} is not one of the widths the run computes '
                     f'({widths}: {act.buckets} buckets).')
  if off:
    raise ValueError(f'{flag}={fraction} keeps no whole number of the '
                     f'{cfg.num_layers} blocks (site layers).')
