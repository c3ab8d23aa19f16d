"""The activation plan: what is on in every layer of one forward pass (docs/design.md §2).

A plan is a tuple with one `LayerPlan` per block; `None` instead of a plan is the dense model.
A layer says what is on at each *site* and whether the block runs, and every part says by its
type how the model computes it:

  site kinds (the MLP's hidden units, or the attention heads, of one layer)
    StaticWidth   a width known when tracing: only that width is compiled (fixed-fraction
                  evaluation and decoding; export);
    DrawnWidth    a traced bucket index: one `lax.switch` branch per width, only the drawn one
                  runs (training, a fresh draw per token at decode);
    UnitMask      a 0/1 mask over the units, for the whole pass ([d]) or per position ([L, d],
                  [B, L, d]): every unit is computed and the off ones are zeroed (`bernoulli`,
                  the reference the others are tested against, the `random` evaluation policy).

  block kinds (whether the residual block runs)
    StaticBlock   known when tracing: the block is compiled, or it is not;
    DrawnBlock    a traced bool: `nn.cond` runs only the taken branch;
    BlockMask     a float 0/1 gate ([], [L] or [B, L]): the block is computed and its output
                  kept where the gate is 1.

`activation.make_plan` builds plans from keys; `models/widths.at_width` and `models/gpt.Block`
are the two places that dispatch on these kinds. The types are pytrees (flax structs): a plan can
be vmapped over positions, passed through `jit`, or closed over; static fields (a static width,
the number of buckets) are part of the tree's structure.
"""
from __future__ import annotations

from typing import Any, Union

import flax
import jax
import jax.numpy as jnp

_static = lambda **kw: flax.struct.field(pytree_node=False, **kw)


class _Width:
  """What StaticWidth and DrawnWidth share: `d` units in `buckets` widths d*(j+1)/buckets."""
  d: int
  buckets: int
  rescale: bool
  perm: Any

  def width(self, bucket: int) -> int:
    """Units on at bucket index `bucket` (static)."""
    return self.d * (bucket + 1) // self.buckets

  def units(self, bucket: int, perm=None):
    """The units on at a static bucket: a prefix slice (`nested`) or the first k of the
    permutation (`random`): `perm` as a switch branch receives it, else the site's own."""
    k, perm = self.width(bucket), self.perm if perm is None else perm
    return slice(0, k) if perm is None else perm[:k]

  def to_mask(self) -> jax.Array:
    """The same units as a 0/1 float mask over the d units."""
    k = self.width(jnp.asarray(self.bucket))
    rank = jnp.arange(self.d) if self.perm is None else jnp.argsort(self.perm)
    return (rank < k).astype(jnp.float32)

  def scale(self, k: int) -> float:
    """d/k with `rescale` (inverted-dropout scaling of the site's output), else 1."""
    return self.d / k if self.rescale else 1.0


@flax.struct.dataclass
class StaticWidth(_Width):
  """A width fixed at trace time: bucket index `bucket`, units `units(bucket)`."""
  bucket: int = _static()
  perm: jax.Array | None = None   # `random`: a permutation of the d units; perm[:k] are on
  d: int = _static(default=0)
  buckets: int = _static(default=1)
  rescale: bool = _static(default=False)


@flax.struct.dataclass
class DrawnWidth(_Width):
  """A drawn width: `bucket` an int32 scalar, resolved by `lax.switch` at run time."""
  bucket: jax.Array
  perm: jax.Array | None = None
  d: int = _static(default=0)
  buckets: int = _static(default=1)
  rescale: bool = _static(default=False)


@flax.struct.dataclass
class UnitMask:
  """A 0/1 mask over the d units, [d] for the pass or [..., L, d] per position."""
  mask: jax.Array
  d: int = _static(default=0)
  rescale: bool = _static(default=False)

  @property
  def per_position(self) -> bool:
    return self.mask.ndim > 1

  def to_mask(self) -> jax.Array:
    return self.mask

  def scaled(self) -> jax.Array:
    """The mask times d/k (k the units on, per position) with `rescale`."""
    if not self.rescale:
      return self.mask
    return self.mask * (self.d / jnp.maximum(self.mask.sum(-1, keepdims=True), 1.0))


Site = Union[StaticWidth, DrawnWidth, UnitMask]


@flax.struct.dataclass
class StaticBlock:
  """The block runs (`on`) or is skipped, known at trace time."""
  on: bool = _static(default=True)

  def to_mask(self) -> jax.Array:
    return jnp.float32(self.on)


@flax.struct.dataclass
class DrawnBlock:
  """Whether the block runs, a traced bool scalar."""
  on: jax.Array

  def to_mask(self) -> jax.Array:
    return jnp.asarray(self.on, jnp.float32)


@flax.struct.dataclass
class BlockMask:
  """A float 0/1 gate on the block's output: [] for the pass, [L] or [B, L] per position."""
  mask: jax.Array

  def to_mask(self) -> jax.Array:
    return self.mask


Block = Union[StaticBlock, DrawnBlock, BlockMask]


@flax.struct.dataclass
class LayerPlan:
  """One layer: its MLP site, its heads site (None: all on) and its block (None: it runs)."""
  mlp: Site | None = None
  heads: Site | None = None
  block: Block | None = None


Plan = tuple  # tuple[LayerPlan, ...], one per layer


def as_masks(plan: Plan) -> Plan:
  """The same units and blocks as 0/1 masks: the reference computation (everything computed)."""
  def masked(site):
    return None if site is None else UnitMask(site.to_mask(), d=site.d, rescale=site.rescale)
  return tuple(LayerPlan(mlp=masked(l.mlp), heads=masked(l.heads),
                         block=None if l.block is None else BlockMask(l.block.to_mask()))
               for l in plan)


def escalate(masks: Plan, escalate_mask: jax.Array) -> Plan:
  """A masks plan (`as_masks`) with everything on where `escalate_mask` ([L] or [B, L]) is true:
  per position, the narrow plan's units or the full width (the `adaptive` policy)."""
  def site(m):
    return None if m is None else UnitMask(jnp.where(escalate_mask[..., None], 1.0, m.mask),
                                           d=m.d, rescale=m.rescale)
  return tuple(LayerPlan(mlp=site(l.mlp), heads=site(l.heads),
                         block=None if l.block is None else BlockMask(
                             jnp.where(escalate_mask, 1.0, l.block.mask))) for l in masks)


def active_fractions(plan: Plan) -> dict[str, jax.Array]:
  """Realized fraction of MLP units, heads and blocks that are on (means over layers; per
  position when the plan is)."""
  out = {}
  for name in ('mlp', 'heads'):
    sites = [getattr(l, name) for l in plan if getattr(l, name) is not None]
    if sites:
      out[name] = jnp.mean(jnp.stack([jnp.mean(s.to_mask(), axis=-1) for s in sites]), axis=0)
  blocks = [l.block for l in plan if l.block is not None]
  if blocks:
    out['layers'] = jnp.mean(jnp.stack([b.to_mask() for b in blocks]), axis=0)
  return out
