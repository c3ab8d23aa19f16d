"""`lax.switch` over static widths whose backward pass stores only the taken branch's residuals.

The random activation runs one branch of a `lax.switch` per drawn width, so only that width is
computed. Forward, that is what `lax.switch` does. Under `jax.grad`, however, JAX's rule for
`switch` makes every branch return the union of all branches' residuals, the taken branch
filling the others' with zeros: with four widths, a step at width 1/2 writes residuals for
widths 1/4, 3/4 and 1 as zeros (measured on the :gpu MLP at 1/2 width, XLA:CPU: 68 ms per
forward+backward instead of 28 ms for the static width).

`switch` here is a `custom_vjp` that keeps the residuals of the taken branch only: each branch
marks the activations its backward pass needs with `save(x)` (`checkpoint_name`; cuDNN's fused
attention keeps its own outputs, see `_policy`); everything
else, including slices and gathers of the weights, is recomputed in the backward pass from
the operands, which are live anyway. Residual i of branch j is padded to the largest
shape of residual i over the branches so all branches agree on one set of buffers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

RESIDUAL = 'rag_switch_residual'
_NAMED = jax.checkpoint_policies.save_only_these_names(RESIDUAL)
# JAX's cuDNN fused attention: the forward primitive, whose outputs (the attention output and the
# softmax statistics) its backward kernel reads.
_FUSED_ATTENTION_FWD = 'dot_product_attention_fwd'


def _policy(prim, *args, **params) -> bool:
  """Saved in a branch: what `save` marks, and the outputs of cuDNN's fused attention forward.
  Without the second, the backward pass ran the flash-attention forward kernel again (it needs
  the softmax statistics, which no name reaches): on an H200, the RA step at a = 0.5 spent as
  long in cuDNN's forward kernel as the dense step (experiments/profile_step.py)."""
  return _NAMED(prim, *args, **params) or prim.name.startswith(_FUSED_ATTENTION_FWD)


def save(x: jax.Array) -> jax.Array:
  """Marks `x` as a residual a switch branch keeps for its backward pass."""
  return checkpoint_name(x, RESIDUAL)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _residual_slots(shapes):
  """(buffers, per branch the buffer of each of its residuals): when every branch saves the
  same kinds of residuals, residual i of every branch shares a buffer of the largest shape;
  otherwise each branch keeps buffers of its own (zeros when not taken)."""
  n = len(shapes)
  aligned = (len({len(s) for s in shapes}) == 1 and
             all(len({(a.ndim, a.dtype) for a in slot}) == 1 for slot in zip(*shapes)))
  if aligned:
    slots = [jax.ShapeDtypeStruct(tuple(max(d) for d in zip(*[a.shape for a in slot])),
                                  slot[0].dtype) for slot in zip(*shapes)]
    return slots, [list(range(len(slots)))] * n
  slots = [a for s in shapes for a in s]
  offsets = [sum(len(s) for s in shapes[:j]) for j in range(n)]
  return slots, [list(range(offsets[j], offsets[j] + len(shapes[j]))) for j in range(n)]


def switch(index, branches: Sequence[Callable[[Any], Any]], operands: Any) -> Any:
  """`branches[index](operands)`; `index` a Python int (just that branch) or an int32 scalar.

  `operands` is a pytree; its float leaves are differentiated, the others (unit indices,
  masks) are not. Branches must not close over traced values.
  """
  if isinstance(index, int):
    return branches[index](operands)
  leaves, treedef = jax.tree.flatten(operands)
  is_diff = [_is_float(l) for l in leaves]
  diff = [l for l, d in zip(leaves, is_diff) if d]
  const = [l for l, d in zip(leaves, is_diff) if not d]

  def merge(diff, const):
    diff, const = iter(diff), iter(const)
    return jax.tree.unflatten(treedef, [next(diff) if d else next(const) for d in is_diff])

  n = len(branches)
  # Per branch: how its vjp closure is built, which closure leaves are operands (index into
  # `diff`/`const`, recomputed from them) and which are saved residuals.
  vjp_defs = [None] * n
  where = [None] * n

  def forward(j):
    def fn(diff, const):
      out, vjp_fn = jax.vjp(
          jax.checkpoint(lambda *d: branches[j](merge(d, const)), policy=_policy), *diff)
      closure, vjp_defs[j] = jax.tree.flatten(vjp_fn)
      where[j], saved = [], []
      for leaf in closure:
        src = next((('d', i) for i, x in enumerate(diff) if leaf is x), None) or next(
            (('c', i) for i, x in enumerate(const) if leaf is x), None)
        where[j].append(src)
        if src is None:
          saved.append(leaf)
      return out, saved
    return fn

  shapes = [jax.eval_shape(forward(j), diff, const)[1] for j in range(n)]
  slots, slot_of = _residual_slots(shapes)

  def fill(j, saved):
    out = [jnp.zeros(a.shape, a.dtype) for a in slots]
    for i, x in zip(slot_of[j], saved):
      out[i] = jnp.pad(x, [(0, m - s) for s, m in zip(x.shape, slots[i].shape)])
    return out

  @jax.custom_vjp
  def run(index, diff, const):
    return jax.lax.switch(index, [lambda d, c, j=j: branches[j](merge(d, c)) for j in range(n)],
                          diff, const)

  def run_fwd(index, diff, const):
    def branch(j):
      def fn(diff, const):
        out, saved = forward(j)(diff, const)
        return out, fill(j, saved)
      return fn
    out, buffers = jax.lax.switch(index, [branch(j) for j in range(n)], diff, const)
    return out, (index, buffers, diff, const)

  def run_bwd(res, ct):
    index, buffers, diff, const = res

    def branch(j):
      def fn(buffers, diff, const, ct):
        saved = iter(buffers[i][tuple(slice(0, s) for s in a.shape)]
                     for i, a in zip(slot_of[j], shapes[j]))
        closure = [next(saved) if src is None else (diff if src[0] == 'd' else const)[src[1]]
                   for src in where[j]]
        return list(jax.tree.unflatten(vjp_defs[j], closure)(ct))
      return fn

    grads = jax.lax.switch(index, [branch(j) for j in range(n)], buffers, diff, const, ct)
    return None, grads, [None] * len(const)

  run.defvjp(run_fwd, run_bwd)
  return run(index, diff, const)
