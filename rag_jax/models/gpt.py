"""A GPT in Flax Linen with an explicit KV cache.

Parameters are declared explicitly (no nn.Dense) so that a sub-width of every matrix can be taken
by slicing, which is how the random activation skips compute.

Shape suffixes: B batch, L tokens in this call, S cache length, D embed (residual) width, H heads,
K head width, F MLP width, V vocabulary.

Precision: parameters are float32; `GPTConfig.dtype` ('bfloat16') casts them at use, so
activations and matmuls run in that dtype while LayerNorm statistics, the attention softmax and
the logits stay float32. Sharding: every parameter has logical axis names (`PARAM_AXES`), which
`train.Shardings` maps to mesh axes by `config.mesh.rules`; the arrays themselves stay plain.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rag_jax import activation
from rag_jax.models import switch

LN_EPS = 1e-5  # torch's LayerNorm default, as nanoGPT
# XLA's cost-analysis count for one exact (erf) GELU: erf lowers to a rational polynomial.
GELU_FLOPS = 64
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

  @property
  def head_dim(self) -> int:  # K
    return self.embed_dim // self.num_heads

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int,
                  dtype: str = 'float32') -> 'GPTConfig':
    return cls(
        vocab_size=int(vocab_size), num_layers=model.num_layers, num_heads=model.num_heads,
        embed_dim=model.embed_dim, mlp_dim=model.mlp_dim, block_size=model.block_size,
        dropout=float(model.dropout), use_bias=bool(model.use_bias), dtype=dtype,
        attention=model.get('attention', 'auto'))


# Logical axis names of every parameter, by name (LayerNorm's are `scale` and `bias`); None is
# an axis that is never split. train.Shardings maps the names to mesh axes (config.mesh.rules).
PARAM_AXES = {
    'wte': ('vocab', 'embed'), 'wpe': ('position', 'embed'),
    'query': ('embed', 'heads', 'head_dim'), 'query_bias': ('heads', 'head_dim'),
    'key_value': ('embed', None, 'heads', 'head_dim'), 'key_value_bias': (None, 'heads', 'head_dim'),
    'out': ('heads', 'head_dim', 'embed'), 'out_bias': ('embed',),
    'w_in': ('embed', 'mlp'), 'b_in': ('mlp',), 'w_out': ('mlp', 'embed'), 'b_out': ('embed',),
    'scale': ('embed',), 'bias': ('embed',),
}


def param_axes(path, ndim: int) -> tuple[str | None, ...] | None:
  """The logical axes of a leaf at `path` (a jax.tree_util key path into params, or into an
  optimizer state mirroring them); None for leaves that are not parameters (step counters)."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  axes = PARAM_AXES.get(names[-1]) if names else None
  return axes if axes is not None and len(axes) == ndim else None


def shard_batch(x_BxLxD: jax.Array) -> jax.Array:
  """`x` split by batch over the (data, fsdp) axes of the mesh in context (`jax.set_mesh`, as
  train.py sets it); unchanged without one. Between blocks this keeps XLA from re-splitting
  activations along the model width to match FSDP-split weights: it gathers the weights instead
  (ZeRO-3), and the collectives stay the size of the weights, not of the activations."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x_BxLxD.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x_BxLxD
  return jax.lax.with_sharding_constraint(x_BxLxD, jax.sharding.PartitionSpec(axes))


def init_cache(cfg: GPTConfig, batch_size: int, length: int | None = None,
               dtype: Any = None) -> Cache:
  """An empty KV cache of `length` positions (default: the context length), in `cfg.dtype`
  unless `dtype` is given."""
  dtype = dtype or cfg.dtype
  shape = (batch_size, length or cfg.block_size, cfg.num_heads, cfg.head_dim)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
          for _ in range(cfg.num_layers)]


def _dense_init(cfg: GPTConfig, residual: bool = False):
  # GPT-2 / nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers).
  std = 0.02 / math.sqrt(2 * cfg.num_layers) if residual else 0.02
  return nn.initializers.normal(stddev=std)


def _matmul(x_BxLxD, w_DxF, out_dtype=None):
  """x @ w with the leading axes flattened. Numerically the same; on XLA:CPU it lets the weight
  gradient be laid out without transposing the large activation gradient, which made the default
  train step 0.78x as long (experiments/bench_train.py). `out_dtype`: the product's dtype
  (float32 logits from bfloat16 operands)."""
  y = jnp.matmul(x_BxLxD.reshape(-1, x_BxLxD.shape[-1]), w_DxF, preferred_element_type=out_dtype)
  return y.reshape(*x_BxLxD.shape[:-1], -1)


def _switched(site: activation.Site, fn, operands):
  """`fn(operands, units, scale)` at the site's width: static, or one `lax.switch` branch per
  bucket (switch.switch, whose backward pass keeps only the taken branch's residuals)."""
  def branch(bucket):
    def run(ops):
      ops = dict(ops)
      units = site.units(bucket, ops.pop('perm'))
      return fn(ops, units, site.scale(site.width(bucket)))
    return run

  operands = {**operands, 'perm': site.perm}
  return switch.switch(site.bucket, [branch(j) for j in range(site.buckets)], operands)


def _blocks(w, units, axis: int) -> list[jax.Array]:
  """`w` restricted to `units` along `axis`, as a list of arrays to use one after the other.

  One array (a slice or gather) in the parameters' own layout. In a decode layout
  (`decode_variables`) `w` is a tuple of separate arrays: equal blocks, of which the first
  that make up the nested width are used, or prefixes of growing width, of which the one of
  that width is. Separate arrays are read in place, where a slice of one array is copied first:
  on XLA:CPU that copy ate the saving of a narrow decode step.
  """
  if isinstance(w, (tuple, list)):
    if not isinstance(units, slice):
      raise ValueError('a decode layout serves nested (prefix) widths only.')
    sizes = [x.shape[axis] for x in w]
    if len(set(sizes)) > 1:  # prefixes
      k = sizes[-1] if units.stop is None else units.stop
      if k not in sizes:
        raise ValueError(f'this decode layout holds widths {sizes}, not {k}.')
      return [w[sizes.index(k)]]
    if units.stop is None:
      return list(w)
    n, rest = divmod(units.stop, sizes[0])
    assert rest == 0, (units, sizes, axis)
    return list(w[:n])
  index = [slice(None)] * w.ndim
  index[axis] = units
  return [w[tuple(index)]]


def _heads(w, x_BxLxD, k, v, mask, units, scale=1.0, head_mask=None, impl='xla'):
  """Queries, attention and output projection of the heads `units`. Keys and values (BxSxHxK)
  are given for every head. `head_mask`: a 0/1 mask over heads ([H] or per position [L, H]).
  Weights are cast to the activations' dtype at use."""
  B, L, D = x_BxLxD.shape
  dt = x_BxLxD.dtype
  x_NxD = x_BxLxD.reshape(B * L, D)
  qs = [jnp.einsum('ND,DHK->NHK', x_NxD, wq.astype(dt)) for wq in _blocks(w['query'], units, 1)]
  q_NxhxK = qs[0] if len(qs) == 1 else jnp.concatenate(qs, axis=1)
  if 'query_bias' in w:
    bias = _blocks(w['query_bias'], units, 0)
    q_NxhxK += (bias[0] if len(bias) == 1 else jnp.concatenate(bias)).astype(dt)
  q_BxLxhxK = switch.save(q_NxhxK.reshape(B, L, *q_NxhxK.shape[1:]))
  o_BxLxhxK = switch.save(_attend(q_BxLxhxK, k, v, mask, units, impl))
  if head_mask is not None:
    o_BxLxhxK = o_BxLxhxK * head_mask[..., None].astype(dt)
  o_NxhxK = (o_BxLxhxK * scale).reshape(B * L, *o_BxLxhxK.shape[2:])
  y_NxD, start = 0.0, 0
  for wo in _blocks(w['out'], units, 0):
    y_NxD += jnp.einsum('NHK,HKD->ND', o_NxhxK[:, start:start + wo.shape[0]], wo.astype(dt))
    start += wo.shape[0]
  y_BxLxD = y_NxD.reshape(B, L, D)
  return y_BxLxD + w['out_bias'].astype(dt) if 'out_bias' in w else y_BxLxD


def attention_impl(cfg: GPTConfig, dtype, causal: bool) -> str:
  """The `jax.nn.dot_product_attention` implementation for a call: with `cfg.attention='auto'`,
  cuDNN's fused kernel on a GPU for 16-bit causal attention (training, evaluation) when cuDNN
  lowers it there; XLA's otherwise (CPU, TPU, float32, the masked decode step)."""
  if cfg.attention != 'auto':
    return cfg.attention
  ok = (jax.default_backend() == 'gpu' and causal and cfg.head_dim % 8 == 0
        and cfg.head_dim <= 128 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and _cudnn_lowers(cfg.head_dim, jnp.dtype(dtype).name))
  return 'cudnn' if ok else 'xla'


@functools.cache
def _cudnn_lowers(head_dim: int, dtype: str) -> bool:
  """Whether this GPU's cuDNN takes causal attention of this head width (a lowering, not a run)."""
  q = jax.ShapeDtypeStruct((1, 128, 1, head_dim), jnp.dtype(dtype))
  try:
    jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                              implementation='cudnn')).lower(q, q, q)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _attend(q_BxLxhxK, k_BxSxHxK, v_BxSxHxK, mask_LxS, units, impl='xla'):
  """Attention of the heads `units`: causal over positions 0..L-1 when `mask_LxS` is None.
  The softmax is float32 in both implementations."""
  dt = q_BxLxhxK.dtype
  k_BxSxhxK, v_BxSxhxK = k_BxSxHxK[:, :, units].astype(dt), v_BxSxHxK[:, :, units].astype(dt)
  if mask_LxS is None:
    return jax.nn.dot_product_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, is_causal=True,
                                        implementation=impl)
  return jax.nn.dot_product_attention(q_BxLxhxK, k_BxSxhxK, v_BxSxhxK, mask=mask_LxS[None, None],
                                      implementation=impl)


def _mlp(w, x_BxLxD, units, scale=1.0, unit_mask=None):
  """GELU MLP over the hidden `units`; `unit_mask`: a 0/1 mask over units ([F] or [L, F])."""
  dt = x_BxLxD.dtype
  w_in, w_out = _blocks(w['w_in'], units, 1), _blocks(w['w_out'], units, 0)
  b_in = _blocks(w['b_in'], units, 0) if 'b_in' in w else [None] * len(w_in)
  y, start = 0.0, 0
  for wi, bi, wo in zip(w_in, b_in, w_out):
    h = _matmul(x_BxLxD, wi.astype(dt))
    # Exact (erf) GELU, as nanoGPT / torch.nn.GELU().
    h = jax.nn.gelu(switch.save(h if bi is None else h + bi.astype(dt)), approximate=False)
    if unit_mask is not None:  # this block's units of the mask
      h = h * unit_mask[..., start:start + h.shape[-1]].astype(dt)
    start += h.shape[-1]
    y += _matmul(h * scale, wo.astype(dt))
  return y + w['b_out'].astype(dt) if 'b_out' in w else y


def _weights(module: nn.Module, names) -> dict[str, jax.Array]:
  return {n: getattr(module, n) for n in names if hasattr(module, n)}


# The weights a nested width takes a prefix of, by site and module: (name, axis of the units).
SWITCHED = {'heads': ('attn', (('query', 1), ('query_bias', 0), ('out', 0))),
            'mlp': ('mlp', (('w_in', 1), ('b_in', 0), ('w_out', 0)))}


def _param(module: nn.Module, name: str, init, shape):
  """A parameter (float32, with logical axes in PARAM_AXES), or its tuple of blocks when the
  decode layout provides one."""
  assert len(PARAM_AXES[name]) == len(shape), (name, shape)
  if module.has_variable('blocks', name):
    return tuple(module.get_variable('blocks', name))
  return module.param(name, init, shape)


def decode_variables(params, buckets: int, widths: Sequence[int] | None = None,
                     sites: Sequence[str] = ('mlp', 'heads')) -> dict:
  """The variables for decoding nested widths in a loop: `params` without the weights of the
  `sites` (SWITCHED), which go, as tuples of separate arrays along their units, into a `blocks`
  collection. `model.apply(decode_variables(p, b), ...)` computes what
  `model.apply({'params': p}, ...)` does.

  `widths=None`: each weight split into `buckets` equal blocks; a width of j buckets reads j
  arrays (no extra memory; j matrix products per weight). `widths` (bucket indices): one
  prefix array per listed width (one product per weight; memory: the sum of those widths, e.g.
  3.5x the switched weights for all of 6 buckets). Build it once, outside the decode loop (it
  copies those weights once).
  """
  params = jax.tree.map(lambda x: x, dict(params))  # a copy to edit
  blocks = {}
  for layer, modules in params.items():
    if not layer.startswith('block_'):
      continue
    modules = params[layer] = {m: dict(v) for m, v in modules.items()}
    for module, names in (SWITCHED[site] for site in sites if site in SWITCHED):
      for name, axis in names:
        if name not in modules[module]:
          continue
        w = modules[module].pop(name)
        if widths is None:
          split = tuple(jnp.split(w, buckets, axis=axis))
        else:
          d = w.shape[axis]
          split = tuple(jax.lax.slice_in_dim(w, 0, d * (j + 1) // buckets, axis=axis)
                        for j in sorted(set(widths)))
        blocks.setdefault(layer, {}).setdefault(module, {})[name] = split
  return {'params': params, 'blocks': blocks}


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

  def write_kv(self, x_BxLxD, cache, pos):
    """Keys and values of every head, written into the cache at `pos` when there is one;
    returns (keys, values, new cache)."""
    B, L, D = x_BxLxD.shape
    kv = jnp.einsum('ND,DCHK->NCHK', x_BxLxD.reshape(B * L, D),
                    self.key_value.astype(x_BxLxD.dtype))
    if self.cfg.use_bias:
      kv += self.key_value_bias.astype(x_BxLxD.dtype)
    kv_BxLx2xHxK = kv.reshape(B, L, *kv.shape[1:])
    k_BxLxHxK, v_BxLxHxK = kv_BxLx2xHxK[:, :, 0], kv_BxLx2xHxK[:, :, 1]
    if cache is None:
      return k_BxLxHxK, v_BxLxHxK, None
    k = jax.lax.dynamic_update_slice(cache['k'], k_BxLxHxK.astype(cache['k'].dtype), (0, pos, 0, 0))
    v = jax.lax.dynamic_update_slice(cache['v'], v_BxLxHxK.astype(cache['v'].dtype), (0, pos, 0, 0))
    return k, v, {'k': k, 'v': v}

  def __call__(self, x_BxLxD, cache=None, pos=0, heads: activation.Site | None = None):
    k, v, new_cache = self.write_kv(x_BxLxD, cache, pos)
    mask_LxS = None
    if cache is not None:
      L, S = x_BxLxD.shape[1], v.shape[1]
      mask_LxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(L))[:, None]
    w = _weights(self, ('query', 'out', 'query_bias', 'out_bias'))
    impl = attention_impl(self.cfg, x_BxLxD.dtype, causal=mask_LxS is None)
    if heads is None:
      return _heads(w, x_BxLxD, k, v, mask_LxS, slice(None), impl=impl), new_cache
    if heads.mask is not None:  # over heads, [H] or per position [L, H]
      return _heads(w, x_BxLxD, k, v, mask_LxS, slice(None),
                    head_mask=heads.mask * heads.scale(heads.mask), impl=impl), new_cache
    fn = lambda ops, units, scale: _heads(ops['w'], ops['x'], ops['k'], ops['v'], ops['mask'],
                                          units, scale, impl=impl)
    ops = {'w': w, 'x': x_BxLxD, 'k': k, 'v': v, 'mask': mask_LxS}
    return _switched(heads, fn, ops), new_cache


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

  def __call__(self, x_BxLxD, site: activation.Site | None = None):
    w = _weights(self, ('w_in', 'w_out', 'b_in', 'b_out'))
    if site is None:
      return _mlp(w, x_BxLxD, slice(None))
    if site.mask is not None:  # [F] or per position [L, F]
      return _mlp(w, x_BxLxD, slice(None), unit_mask=site.mask * site.scale(site.mask))
    fn = lambda ops, units, scale: _mlp(ops['w'], ops['x'], units, scale)
    return _switched(site, fn, {'w': w, 'x': x_BxLxD})


class Block(nn.Module):
  """Pre-LayerNorm residual block. `plan` (one layer of an activation.Plan) says which heads
  and MLP units are on and whether the block runs at all; a skipped block is the identity and,
  with a cache, still writes its keys and values for the token."""
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    # Statistics in float32 (flax upcasts), output in cfg.dtype; parameters float32.
    self.ln_1 = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype)
    self.attn = Attention(cfg)
    self.ln_2 = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype)
    self.mlp = MLP(cfg)
    self.drop = nn.Dropout(cfg.dropout)

  def run(self, x_BxLxD, cache, pos, deterministic, heads, mlp):
    h, new_cache = self.attn(self.ln_1(x_BxLxD), cache, pos, heads)
    x_BxLxD = x_BxLxD + self.drop(h, deterministic=deterministic)
    h = self.mlp(self.ln_2(x_BxLxD), mlp)
    return x_BxLxD + self.drop(h, deterministic=deterministic), new_cache

  def skip(self, x_BxLxD, cache, pos, deterministic, heads, mlp):
    del deterministic, heads, mlp
    if cache is None:
      return x_BxLxD, None
    return x_BxLxD, self.attn.write_kv(self.ln_1(x_BxLxD), cache, pos)[2]

  def __call__(self, x_BxLxD, cache=None, pos=0, deterministic=True, plan=None):
    plan = plan or {}
    on = plan.get('layer')
    args = (x_BxLxD, cache, pos, deterministic, plan.get('heads'), plan.get('mlp'))
    if on is None or on is True:
      return self.run(*args)
    if on is False:
      return self.skip(*args)
    if jnp.issubdtype(jnp.asarray(on).dtype, jnp.bool_):  # drawn: run only the taken branch
      # `deterministic` stays a Python bool (nn.cond would trace its operands).
      run = lambda mdl, x, c, p, h, m: Block.run(mdl, x, c, p, deterministic, h, m)
      skip = lambda mdl, x, c, p, h, m: Block.skip(mdl, x, c, p, deterministic, h, m)
      return nn.cond(on, run, skip, self, x_BxLxD, cache, pos, plan.get('heads'),
                     plan.get('mlp'))
    # A float mask: bernoulli (a scalar), per position [L], or per row and position [B, L].
    y_BxLxD, new_cache = self.run(*args)
    m = jnp.asarray(on)[..., None]
    return x_BxLxD + m * (y_BxLxD - x_BxLxD), new_cache


class GPT(nn.Module):
  """Token + learned position embeddings, blocks, final LayerNorm, weight-tied output head.

  `__call__(tokens_BxL)` is the training/eval forward pass (returns `(logits, None)`);
  with `cache=` and `pos=` it processes tokens at positions pos..pos+L-1 against the cache and
  returns `(logits, new_cache)` (prefill when L > 1, one decode step when L == 1). `plan` (see
  activation.py) switches parts of the network off; None is the dense model.
  """
  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, cache: Cache | None = None, pos=0, deterministic=True,
               plan: activation.Plan | None = None):
    cfg = self.cfg
    wte_VxD = _param(self, 'wte', _dense_init(cfg), (cfg.vocab_size, cfg.embed_dim))
    wpe_TxD = _param(self, 'wpe', _dense_init(cfg), (cfg.block_size, cfg.embed_dim))
    L = tokens_BxL.shape[1]
    pe_LxD = jax.lax.dynamic_slice_in_dim(wpe_TxD, pos, L) if cache is not None else wpe_TxD[:L]
    x_BxLxD = (jnp.take(wte_VxD, tokens_BxL, axis=0) + pe_LxD).astype(cfg.dtype)
    x_BxLxD = shard_batch(nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD))
    new_cache = [] if cache is not None else None
    for i in range(cfg.num_layers):
      x_BxLxD, layer_cache = Block(cfg, name=f'block_{i}')(
          x_BxLxD, None if cache is None else cache[i], pos, deterministic,
          None if plan is None else plan[i])
      x_BxLxD = shard_batch(x_BxLxD)
      if cache is not None:
        new_cache.append(layer_cache)
    x_BxLxD = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, dtype=cfg.dtype,
                           name='ln_f')(x_BxLxD)
    logits_BxLxV = _matmul(x_BxLxD, wte_VxD.T.astype(cfg.dtype), jnp.float32)
    return logits_BxLxV, new_cache


def flops_per_token(cfg: GPTConfig, context: int | None = None, mlp: float = 1.0,
                    heads: float = 1.0, layers: float = 1.0, decode: bool = False) -> float:
  """Analytic forward FLOPs per token (2 per multiply-add) of the matrix products.

  `mlp`, `heads`, `layers`: the fraction of MLP units, heads and blocks that are computed. Keys
  and values are computed for every head of a running block; a skipped block costs nothing in
  the parallel forward pass, and only its keys and values when `decode` (it still writes them
  into the cache). Attention is counted over the whole `context` (default: block_size)
  because the XLA kernel computes the full causal score matrix and masks it. Of the element-wise
  work only the exact GELU counts (GELU_FLOPS per hidden unit: XLA expands erf into a rational
  polynomial); LayerNorm, softmax and residual adds (under 1%) are left out. Tests hold this count
  against XLA's cost analysis.
  """
  T = context or cfg.block_size
  D, F, V = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  kv = 2 * D * 2 * D
  q_attn_out = 2 * D * D + 2 * 2 * T * D + 2 * D * D
  per_layer = kv + heads * q_attn_out + mlp * (2 * 2 * D * F + GELU_FLOPS * F)
  skipped = (1 - layers) * cfg.num_layers * (kv if decode else 0)
  return float(layers * cfg.num_layers * per_layer + skipped + 2 * D * V)
