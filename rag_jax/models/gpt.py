"""A GPT in Flax Linen with an explicit KV cache, whose plan switches parts of it off.

    GPT(cfg).apply({'params': p}, tokens_BxL)                       # training / evaluation
    GPT(cfg).apply({'params': p}, tokens_BxL, cache=c, pos=t)       # prefill, or one decode step
    GPT(cfg).apply({'params': p}, tokens_BxL, plan=plan)            # a part of the network on

`plan` (rag_jax/plan.py; None = dense) says per layer which MLP units and heads are on and
whether the block runs; `models/widths.at_width` computes a site at its width, so the units that
are off are not computed (docs/design.md §3). Parameters are declared explicitly (no nn.Dense) so
that a sub-width of every matrix can be taken by slicing.

Shape suffixes: B batch, L tokens in this call, S cache length, D embed (residual) width, H heads,
K head width, F MLP width, V vocabulary; lower-case h a subset of the heads.

Precision: parameters are float32; `GPTConfig.dtype` ('bfloat16') casts them at use, so
activations and matmuls run in that dtype while LayerNorm statistics, the attention softmax and
the logits stay float32. Sharding: every parameter has logical axis names (sharding.PARAM_AXES)
that config.mesh.rules maps to mesh axes; the arrays themselves stay plain.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rag_jax import plan as plan_lib
from rag_jax import sharding
from rag_jax.models import attention
from rag_jax.models import switch
from rag_jax.models import widths

LN_EPS = 1e-5  # torch's LayerNorm default, as nanoGPT
# One {'k': BxSxHxK, 'v': BxSxHxK} per layer. (Head-major layouts, BxHxKxS for keys, save XLA a
# transpose per step but lose the in-place cache update: 2x slower decode on XLA:CPU.)
Cache = list[dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int    # V
  num_layers: int    # number of residual blocks
  num_heads: int     # H
  embed_dim: int     # D
  mlp_dim: int       # F
  block_size: int    # T: context length (learned positions)
  dropout: float = 0.0
  use_bias: bool = False
  dtype: str = 'float32'   # activations and matmuls; parameters stay float32.
  attention: str = 'auto'  # 'auto' (cuDNN on GPU when it applies, else XLA), 'xla' or 'cudnn'.
  # K: the width of a head; 0 = embed_dim // num_heads. Explicit in an exported sub-model, whose
  # fewer heads keep their width (rag_jax/export.py).
  head_dim: int = 0
  # The MLP's GELU: 'exact' (erf, torch.nn.GELU(), nanoGPT) or 'tanh' (GPT-2's 'gelu_new').
  gelu: str = 'exact'
  # Per-block heads and MLP units (one per block), or () for num_heads and mlp_dim in every
  # block: a per-layer plan exported as a model of its own (rag_jax/export.py --plan).
  layer_heads: tuple[int, ...] = ()
  layer_mlp_dims: tuple[int, ...] = ()

  def __post_init__(self):
    if not self.head_dim:
      object.__setattr__(self, 'head_dim', self.embed_dim // self.num_heads)
    for name in ('layer_heads', 'layer_mlp_dims'):
      value = tuple(int(v) for v in getattr(self, name) or ())
      object.__setattr__(self, name, value)
      if value and len(value) != self.num_layers:
        raise ValueError(f'GPTConfig.{name} has {len(value)} entries for {self.num_layers} '
                         'blocks.')

  @property
  def attn_dim(self) -> int:  # H·K, the width of the queries, keys and values
    return self.num_heads * self.head_dim

  @property
  def per_layer(self) -> bool:
    """Whether the blocks differ in heads or MLP units."""
    return bool(self.layer_heads or self.layer_mlp_dims)

  def heads_of(self, layer: int) -> int:
    return self.layer_heads[layer] if self.layer_heads else self.num_heads

  def mlp_dim_of(self, layer: int) -> int:
    return self.layer_mlp_dims[layer] if self.layer_mlp_dims else self.mlp_dim

  def block(self, layer: int) -> 'GPTConfig':
    """The config of one block: its own heads and MLP units as num_heads and mlp_dim."""
    if not self.per_layer:
      return self
    return dataclasses.replace(self, num_heads=self.heads_of(layer),
                               mlp_dim=self.mlp_dim_of(layer), layer_heads=(), layer_mlp_dims=())

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int,
                  dtype: str = 'float32') -> 'GPTConfig':
    return cls(
        vocab_size=int(vocab_size), num_layers=model.num_layers, num_heads=model.num_heads,
        embed_dim=model.embed_dim, mlp_dim=model.mlp_dim, block_size=model.block_size,
        dropout=float(model.dropout), use_bias=bool(model.use_bias), dtype=dtype,
        attention=model.get('attention', 'auto'), head_dim=int(model.get('head_dim', 0)),
        gelu=model.get('gelu', 'exact'), layer_heads=tuple(model.get('layer_heads', ()) or ()),
        layer_mlp_dims=tuple(model.get('layer_mlp_dims', ()) or ()))


def rebuild_keep(block_size: int) -> int:
  """The decoders' context rule: when a token would land at position T, the KV cache is rebuilt
  from the last T//2 - 1 tokens (positions 0..) and the token lands after them, so every token
  sees between T//2 and T tokens (decode, engine and speculative decoding share it)."""
  return max(block_size // 2, 1) - 1


def write_cache(cache: Cache, new: Cache, pos) -> Cache:
  """`cache` with the keys and values `new` (a read-only pass's, [B x] L x H x K per layer)
  written at `pos` (the position axis is the third from the end)."""
  return jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(
      c, n.astype(c.dtype), pos, axis=c.ndim - 3), cache, new)


def init_cache(cfg: GPTConfig, batch_size: int, length: int | None = None,
               dtype: Any = None) -> Cache:
  """An empty KV cache of `length` positions (default: the context length), in `cfg.dtype`
  unless `dtype` is given."""
  dtype = dtype or cfg.dtype
  shape = lambda l: (batch_size, length or cfg.block_size, cfg.heads_of(l), cfg.head_dim)
  return [{'k': jnp.zeros(shape(l), dtype), 'v': jnp.zeros(shape(l), dtype)}
          for l in range(cfg.num_layers)]


def _dense_init(cfg: GPTConfig, residual: bool = False):
  # GPT-2 / nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers).
  std = 0.02 / math.sqrt(2 * cfg.num_layers) if residual else 0.02
  return nn.initializers.normal(stddev=std)


def _param(module: nn.Module, name: str, init, shape):
  """A float32 parameter with logical axes in sharding.PARAM_AXES; in the decode layout
  (widths.decode_variables) a switched weight comes as its `Prefixes` instead."""
  assert len(sharding.PARAM_AXES[name]) == len(shape), (name, shape)
  if module.has_variable('decode', name):
    return module.get_variable('decode', name)
  return module.param(name, init, shape)


def take_units(block: dict, heads, units) -> dict:
  """A block's parameters restricted to `heads` and MLP `units` (slices or index arrays, along
  the axis each weight holds them on): the one place that knows which weights carry a head or
  a hidden unit (export's slicing, reorder's permutation)."""
  attn, mlp = dict(block['attn']), dict(block['mlp'])
  attn['query'], attn['key_value'] = attn['query'][:, heads], attn['key_value'][:, :, heads]
  attn['out'] = attn['out'][heads]
  if 'query_bias' in attn:
    attn['query_bias'] = attn['query_bias'][heads]
    attn['key_value_bias'] = attn['key_value_bias'][:, heads]
  mlp['w_in'], mlp['w_out'] = mlp['w_in'][:, units], mlp['w_out'][units]
  if 'b_in' in mlp:
    mlp['b_in'] = mlp['b_in'][units]
  return {**block, 'attn': attn, 'mlp': mlp}


def _matmul(x_BxLxD, w_DxF, out_dtype=None):
  """x @ w with the leading axes flattened. Numerically the same; on XLA:CPU it lets the weight
  gradient be laid out without transposing the large activation gradient, which made the default
  train step 0.78x as long (experiments/bench_train.py). `out_dtype`: the product's dtype
  (float32 logits from bfloat16 operands)."""
  y = jnp.matmul(x_BxLxD.reshape(-1, x_BxLxD.shape[-1]), w_DxF, preferred_element_type=out_dtype)
  return y.reshape(*x_BxLxD.shape[:-1], -1)


def _project(x_BxLxD, w_Dx___, b___=None):
  """x @ w (+ b) over D for a weight of any trailing shape ([D, H, K], [D, 2, H, K]), as one
  2-D product in x's dtype: [B, L, *w.shape[1:]]. The query and key/value projections."""
  dt = x_BxLxD.dtype
  y = _matmul(x_BxLxD, w_Dx___.reshape(w_Dx___.shape[0], -1).astype(dt))
  if b___ is not None:
    y += b___.reshape(-1).astype(dt)
  return y.reshape(*x_BxLxD.shape[:-1], *w_Dx___.shape[1:])


def _heads(w, x_BxLxD, k_BxSxHxK, v_BxSxHxK, mask_LxS, units, scale, head_mask, impl,
           new=None):
  """Queries, attention and output projection of the heads `units` (keys and values are given
  for every head); `head_mask`: None or a 0/1 mask over heads ([H], per position [..., L, H]);
  `new`: None, or one decode query's own key and value (Bx1xHxK each), attended beside the
  cache positions `mask_LxS` allows (attention.attend_step)."""
  B, L, D = x_BxLxD.shape
  dt = x_BxLxD.dtype
  wq_DxhxK = widths.restrict(w['query'], units, 1)
  h, K = wq_DxhxK.shape[1:]
  bq_hxK = widths.restrict(w['query_bias'], units, 0) if 'query_bias' in w else None
  q_BxLxhxK = switch.save(_project(x_BxLxD, wq_DxhxK, bq_hxK))
  k_BxSxhxK, v_BxSxhxK = k_BxSxHxK[:, :, units].astype(dt), v_BxSxHxK[:, :, units].astype(dt)
  if new is None:
    o_BxLxhxK = attention.attend(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS, impl)
  else:
    o_BxLxhxK = attention.attend_step(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask_LxS[0],
                                      *(n[:, :, units].astype(dt) for n in new))
  if head_mask is not None:
    o_BxLxhxK = o_BxLxhxK * head_mask[..., None].astype(dt)
  wo_hKxD = widths.restrict(w['out'], units, 0).reshape(h * K, D).astype(dt)
  y_BxLxD = _matmul((o_BxLxhxK * scale).reshape(B, L, h * K), wo_hKxD)
  return y_BxLxD + w['out_bias'].astype(dt) if 'out_bias' in w else y_BxLxD


def _mlp(w, x_BxLxD, units, scale, unit_mask, gelu):
  """GELU MLP over the hidden `units`: exact (erf, as nanoGPT / torch.nn.GELU()) or, with
  `gelu='tanh'`, GPT-2's tanh approximation; `unit_mask`: None or a 0/1 mask over units ([F],
  per position [..., L, F])."""
  dt = x_BxLxD.dtype
  w_in_Dxf, w_out_fxD = widths.restrict(w['w_in'], units, 1), widths.restrict(w['w_out'], units, 0)
  h_BxLxf = _matmul(x_BxLxD, w_in_Dxf.astype(dt))
  if 'b_in' in w:
    h_BxLxf += widths.restrict(w['b_in'], units, 0).astype(dt)
  h_BxLxf = jax.nn.gelu(switch.save(h_BxLxf), approximate=gelu == 'tanh')
  if unit_mask is not None:
    h_BxLxf = h_BxLxf * unit_mask.astype(dt)
  y_BxLxD = _matmul(h_BxLxf * scale, w_out_fxD.astype(dt))
  return y_BxLxD + w['b_out'].astype(dt) if 'b_out' in w else y_BxLxD


def _weights(module: nn.Module, names) -> dict[str, Any]:
  return {n: getattr(module, n) for n in names if hasattr(module, n)}


class Attention(nn.Module):
  """Causal multi-head self-attention; with a cache, writes this call's K/V at `pos`.

  With a `heads` site only the active heads' queries, attention and output projection are
  computed; keys and values are computed for every head so the cache stays complete.
  """
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    self.query = _param(self, 'query', _dense_init(cfg), (D, H, K))
    self.key_value = _param(self, 'key_value', _dense_init(cfg), (D, 2, H, K))
    self.out = _param(self, 'out', _dense_init(cfg, residual=True), (H, K, D))
    if cfg.use_bias:
      self.query_bias = _param(self, 'query_bias', nn.initializers.zeros, (H, K))
      self.key_value_bias = _param(self, 'key_value_bias', nn.initializers.zeros, (2, H, K))
      self.out_bias = _param(self, 'out_bias', nn.initializers.zeros, (D,))

  def write_kv(self, x_BxLxD, cache, pos, read_only=False):
    """Keys and values of every head, written into the cache at `pos` when there is one;
    returns (keys, values, new cache). `read_only`: the new keys and values themselves take the
    new cache's place (write_cache writes them)."""
    bias = self.key_value_bias if self.cfg.use_bias else None
    if cache is None:  # keys (0) and values (1) apart, the heads staying the major axis
      k_BxLxHxK, v_BxLxHxK = (
          _project(x_BxLxD, self.key_value[:, c], None if bias is None else bias[c])
          for c in (0, 1))
      return k_BxLxHxK, v_BxLxHxK, None
    # With a cache (prefill, decode steps, speculative passes: few positions), one product with
    # the whole [D, 2·H·K] weight, read in place, then the small output split: in a decode loop
    # XLA:CPU copied each `key_value[:, c]` slice at every step (2·D·H·K floats per layer and
    # token, about a quarter of the :gpu model's decode step).
    y_BxLx2xHxK = _project(x_BxLxD, self.key_value, bias)
    k_BxLxHxK, v_BxLxHxK = y_BxLx2xHxK[:, :, 0], y_BxLx2xHxK[:, :, 1]
    if read_only:
      return k_BxLxHxK, v_BxLxHxK, {'k': k_BxLxHxK, 'v': v_BxLxHxK}
    k = jax.lax.dynamic_update_slice(cache['k'], k_BxLxHxK.astype(cache['k'].dtype), (0, pos, 0, 0))
    v = jax.lax.dynamic_update_slice(cache['v'], v_BxLxHxK.astype(cache['v'].dtype), (0, pos, 0, 0))
    return k, v, {'k': k, 'v': v}

  def __call__(self, x_BxLxD, cache=None, pos=0, heads: plan_lib.Site | None = None,
               read_only=False):
    """With `read_only` (one decode token), the cache is read as it is, the token's own key and
    value attended beside its positions before `pos`, and returned in the new cache's place."""
    k, v, new_cache = self.write_kv(x_BxLxD, cache, pos, read_only)
    mask_LxS, new = None, None
    if read_only:
      k, v, new = cache['k'], cache['v'], (k, v)
      mask_LxS = jnp.arange(k.shape[1])[None, :] < pos
    elif cache is not None:
      L, S = x_BxLxD.shape[1], v.shape[1]
      mask_LxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(L))[:, None]
    impl = attention.implementation(self.cfg.attention, self.cfg.head_dim, x_BxLxD.dtype,
                                    causal=mask_LxS is None)
    fn = lambda ops, units, scale, head_mask: _heads(
        ops['w'], ops['x'], ops['k'], ops['v'], ops['mask'], units, scale, head_mask, impl,
        ops['new'])
    ops = {'w': _weights(self, ('query', 'out', 'query_bias', 'out_bias')), 'x': x_BxLxD,
           'k': k, 'v': v, 'mask': mask_LxS, 'new': new}
    return widths.at_width(heads, fn, ops), new_cache


class MLP(nn.Module):
  """GELU MLP; with an `mlp` site only the active hidden units are computed."""
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    D, F = cfg.embed_dim, cfg.mlp_dim
    self.w_in = _param(self, 'w_in', _dense_init(cfg), (D, F))
    self.w_out = _param(self, 'w_out', _dense_init(cfg, residual=True), (F, D))
    if cfg.use_bias:
      self.b_in = _param(self, 'b_in', nn.initializers.zeros, (F,))
      self.b_out = _param(self, 'b_out', nn.initializers.zeros, (D,))

  def __call__(self, x_BxLxD, site: plan_lib.Site | None = None):
    fn = lambda ops, units, scale, unit_mask: _mlp(ops['w'], ops['x'], units, scale, unit_mask,
                                                   self.cfg.gelu)
    ops = {'w': _weights(self, ('w_in', 'w_out', 'b_in', 'b_out')), 'x': x_BxLxD}
    return widths.at_width(site, fn, ops)


class Block(nn.Module):
  """Pre-LayerNorm residual block. Its `LayerPlan` says which heads and MLP units are on and
  whether the block runs; a skipped block is the identity and, with a cache, still writes its
  keys and values for the token."""
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    # Statistics in float32 (flax upcasts), output in cfg.dtype; parameters float32.
    self.ln_1 = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype)
    self.attn = Attention(cfg)
    self.ln_2 = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype)
    self.mlp = MLP(cfg)
    self.drop = nn.Dropout(cfg.dropout)

  def run(self, x_BxLxD, cache, pos, deterministic, heads, mlp, read_only=False):
    h, new_cache = self.attn(self.ln_1(x_BxLxD), cache, pos, heads, read_only)
    x_BxLxD = x_BxLxD + self.drop(h, deterministic=deterministic)
    h = self.mlp(self.ln_2(x_BxLxD), mlp)
    return x_BxLxD + self.drop(h, deterministic=deterministic), new_cache

  def skip(self, x_BxLxD, cache, pos, read_only=False):
    if cache is None:
      return x_BxLxD, None
    return x_BxLxD, self.attn.write_kv(self.ln_1(x_BxLxD), cache, pos, read_only)[2]

  def __call__(self, x_BxLxD, cache=None, pos=0, deterministic=True,
               layer: plan_lib.LayerPlan | None = None, read_only=False):
    layer = layer or plan_lib.LayerPlan()
    run = lambda: self.run(x_BxLxD, cache, pos, deterministic, layer.heads, layer.mlp, read_only)
    match layer.block:
      case None:
        return run()
      case plan_lib.StaticBlock(on=on):
        return run() if on else self.skip(x_BxLxD, cache, pos, read_only)
      case plan_lib.DrawnBlock(on=on):  # only the taken branch runs
        # `deterministic` and `read_only` stay Python bools (nn.cond traces its operands).
        return nn.cond(
            on, lambda mdl, x, c, p, h, m: Block.run(mdl, x, c, p, deterministic, h, m,
                                                     read_only),
            lambda mdl, x, c, p, h, m: Block.skip(mdl, x, c, p, read_only), self,
            x_BxLxD, cache, pos, layer.heads, layer.mlp)
      case plan_lib.BlockMask(mask=mask):  # computed; kept where the gate is 1
        y_BxLxD, new_cache = run()
        return x_BxLxD + mask[..., None] * (y_BxLxD - x_BxLxD), new_cache
    raise TypeError(f'not a block of an activation plan: {type(layer.block).__name__}')


class GPT(nn.Module):
  """Token + learned position embeddings, blocks, final LayerNorm, weight-tied output head.

  `__call__(tokens_BxL)` is the training/eval forward pass (returns `(logits, None)`);
  with `cache=` and `pos=` it processes tokens at positions pos..pos+L-1 against the cache and
  returns `(logits, new_cache)` (prefill when L > 1, one decode step when L == 1). With
  `read_only=True` (one token), the cache is only read and the token's keys and values come
  back in its place, for `write_cache`: a program that picks among passes (the engine's widths)
  then moves those, not whole caches, and writes the cache once, in place.
  """
  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, cache: Cache | None = None, pos=0, deterministic=True,
               plan: plan_lib.Plan | None = None, read_only: bool = False):
    cfg = self.cfg
    wte_VxD = _param(self, 'wte', _dense_init(cfg), (cfg.vocab_size, cfg.embed_dim))
    wpe_TxD = _param(self, 'wpe', _dense_init(cfg), (cfg.block_size, cfg.embed_dim))
    B, L = tokens_BxL.shape
    if read_only and (cache is None or L != 1):
      raise ValueError('read_only decodes one token against a cache.')
    if cache is not None:
      pe_xLxD = jax.lax.dynamic_slice_in_dim(wpe_TxD, pos, L)
    else:
      # Gathered per token rather than broadcast over the batch: the broadcast's gradient is a
      # reduction over the batch, for which XLA:GPU laid the whole residual stream out batch-minor
      # ([T, D, B]) and transposed it around every LayerNorm and matmul (275 transposes, 8.7 of
      # 54 ms of the GPT-2-small step on an H100; gathered: none, 0.91x the step;
      # experiments/probe_step_variants.py). The same values, so the same loss.
      pe_xLxD = jnp.take(wpe_TxD, jnp.broadcast_to(jnp.arange(L), (B, L)), axis=0)
    x_BxLxD = (jnp.take(wte_VxD, tokens_BxL, axis=0) + pe_xLxD).astype(cfg.dtype)
    x_BxLxD = sharding.shard_batch(nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD))
    new_cache = [] if cache is not None else None
    for i in range(cfg.num_layers):
      x_BxLxD, layer_cache = Block(cfg.block(i), name=f'block_{i}')(
          x_BxLxD, None if cache is None else cache[i], pos, deterministic,
          None if plan is None else plan[i], read_only)
      x_BxLxD = sharding.shard_batch(x_BxLxD)
      if cache is not None:
        new_cache.append(layer_cache)
    x_BxLxD = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype,
                           name='ln_f')(x_BxLxD)
    logits_BxLxV = _matmul(x_BxLxD, wte_VxD.T.astype(cfg.dtype), jnp.float32)
    return logits_BxLxV, new_cache
