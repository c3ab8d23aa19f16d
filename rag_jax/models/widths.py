"""A site at its width: the one dispatch on the plan's site kinds, and the decode weight layout.

`at_width(site, fn, operands)` runs `fn(operands, units, scale, mask)`, the computation of a
site (attention heads or MLP units) restricted to `units`, as the kind of `site` says
(docs/design.md §3):

  None          all units;
  StaticWidth   its units (a prefix slice or gathered indices), compiled at that width only;
  DrawnWidth    one branch per bucket width under `switch.switch`, so only the drawn width runs
                and the backward pass keeps only that branch's residuals;
  UnitMask      all units, then `mask` zeroes the off ones (no compute saved: the reference).

The decode layout (`decode_variables`): in a decode loop a slice of a loop-invariant weight
(`w[:, :k]`) is copied at every step on XLA:CPU, which ate the saving of a narrow decode step.
So the sampler cuts the switched weights once into `Prefixes`, one separate array per width it
will use, and a width reads its own array in place (`restrict`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax

from rag_jax import plan as plan_lib
from rag_jax.models import switch

ALL = slice(None)

# The weights a site switches, by site and module: (name, axis of the units).
SWITCHED = {'heads': ('attn', (('query', 1), ('query_bias', 0), ('out', 0))),
            'mlp': ('mlp', (('w_in', 1), ('b_in', 0), ('w_out', 0)))}


def at_width(site: plan_lib.Site | None, fn: Callable[..., Any], operands: dict) -> Any:
  """`fn(operands, units, scale, mask)` at the width `site` gives (see the module docstring).

  `units`: ALL, a slice or an index array; `scale`: the rescale factor d/k (or 1);
  `mask`: None, or the [..., d] 0/1 mask (rescale folded in) to multiply the units' outputs by.
  `fn` must not close over traced values (they go in `operands`).
  """
  match site:
    case None:
      return fn(operands, ALL, 1.0, None)
    case plan_lib.UnitMask():
      return fn(operands, ALL, 1.0, site.scaled())
    case plan_lib.StaticWidth():
      return fn(operands, site.units(site.bucket), site.scale(site.width(site.bucket)), None)
    case plan_lib.DrawnWidth():
      def branch(bucket: int):
        def run(ops):
          ops = dict(ops)
          units = site.units(bucket, ops.pop('perm'))
          return fn(ops, units, site.scale(site.width(bucket)), None)
        return run
      return switch.switch(site.bucket, [branch(j) for j in range(site.buckets)],
                           {**operands, 'perm': site.perm})
  raise TypeError(f'not a site of an activation plan: {type(site).__name__}')


@flax.struct.dataclass
class Prefixes:
  """The decode layout of one weight: separate arrays holding its first `widths[i]` units along
  `axis`. `full` is the weight's whole width (a layout may leave it out)."""
  arrays: tuple[jax.Array, ...]
  widths: tuple[int, ...] = flax.struct.field(pytree_node=False)
  axis: int = flax.struct.field(pytree_node=False)
  full: int = flax.struct.field(pytree_node=False)

  def at(self, units) -> jax.Array:
    if not isinstance(units, slice):
      raise ValueError('the decode layout serves nested (prefix) widths only.')
    k = self.full if units.stop is None else units.stop
    if k not in self.widths:
      raise ValueError(f'this decode layout holds widths {list(self.widths)}, not {k}.')
    return self.arrays[self.widths.index(k)]


def restrict(w, units, axis: int) -> jax.Array:
  """Weight `w` restricted to `units` along `axis`: a slice or gather of a parameter, or the
  prefix array of that width from the decode layout (read in place)."""
  if isinstance(w, Prefixes):
    return w.at(units)
  index = [slice(None)] * w.ndim
  index[axis] = units
  return w[tuple(index)]


def decode_variables(params, buckets: int, widths: Sequence[int],
                     sites: Sequence[str] = ('mlp', 'heads')) -> dict:
  """The variables for decoding nested widths in a loop: `params` without the switched weights of
  `sites`, which go, as `Prefixes` of the listed bucket indices `widths`, into a `decode`
  collection. `model.apply(decode_variables(p, ...), ...)` computes what
  `model.apply({'params': p}, ...)` does at those widths. Build it once, outside the loop: it
  copies those weights once (memory: the sum of the listed widths, e.g. 3.5x the switched
  weights for all of 6 buckets)."""
  params, layout = dict(params), {}  # a copy to edit; blocks' modules are copied below
  for layer, modules in params.items():
    if not layer.startswith('block_'):
      continue
    modules = params[layer] = {m: dict(v) for m, v in modules.items()}
    for module, names in (SWITCHED[s] for s in sites if s in SWITCHED):
      for name, axis in names:
        if name not in modules[module]:
          continue
        w = modules[module].pop(name)
        d = w.shape[axis]
        ks = tuple(d * (j + 1) // buckets for j in sorted(set(widths)))
        arrays = tuple(jax.lax.slice_in_dim(w, 0, k, axis=axis) for k in ks)
        layout.setdefault(layer, {}).setdefault(module, {})[name] = Prefixes(
            arrays, widths=ks, axis=axis, full=d)
  return {'params': params, 'decode': layout}
