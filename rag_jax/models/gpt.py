"""A GPT in Flax Linen with an explicit KV cache.

Parameters are declared explicitly (no nn.Dense) so that a sub-width of every matrix can be taken
by slicing, which is how the random activation skips compute.

Shape suffixes: B batch, L tokens in this call, S cache length, D embed (residual) width, H heads,
K head width, F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rag_jax import activation

LN_EPS = 1e-5  # torch's LayerNorm default, as nanoGPT
# XLA's cost-analysis count for one exact (erf) GELU: erf lowers to a rational polynomial.
GELU_FLOPS = 64
Cache = list[dict[str, jax.Array]]  # one {'k': BxSxHxK, 'v': BxSxHxK} per layer.


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

  @property
  def head_dim(self) -> int:  # K
    return self.embed_dim // self.num_heads

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int) -> 'GPTConfig':
    return cls(
        vocab_size=int(vocab_size), num_layers=model.num_layers, num_heads=model.num_heads,
        embed_dim=model.embed_dim, mlp_dim=model.mlp_dim, block_size=model.block_size,
        dropout=float(model.dropout), use_bias=bool(model.use_bias))


def init_cache(cfg: GPTConfig, batch_size: int, length: int | None = None,
               dtype: Any = jnp.float32) -> Cache:
  """An empty KV cache of `length` positions (default: the context length)."""
  shape = (batch_size, length or cfg.block_size, cfg.num_heads, cfg.head_dim)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
          for _ in range(cfg.num_layers)]


def _dense_init(cfg: GPTConfig, residual: bool = False):
  # GPT-2 / nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers).
  std = 0.02 / math.sqrt(2 * cfg.num_layers) if residual else 0.02
  return nn.initializers.normal(stddev=std)


def _matmul(x_BxLxD, w_DxF):
  """x @ w with the leading axes flattened. Numerically the same; on XLA:CPU it lets the weight
  gradient be laid out without transposing the large activation gradient, which made the default
  train step 0.78x as long (experiments/bench_train.py)."""
  return (x_BxLxD.reshape(-1, x_BxLxD.shape[-1]) @ w_DxF).reshape(*x_BxLxD.shape[:-1], -1)


def _switch(site: activation.Site, branch):
  """Runs `branch(bucket)` for the site's bucket: directly when static, else by `lax.switch`,
  which executes only the chosen branch (the skipped widths cost nothing)."""
  if isinstance(site.bucket, int):
    return branch(site.bucket)
  return jax.lax.switch(site.bucket, [functools.partial(branch, j) for j in range(site.buckets)])


class Attention(nn.Module):
  """Causal multi-head self-attention; with a cache, writes this call's K/V at `pos`.

  With a `heads` site only the active heads' queries, attention and output projection are
  computed; keys and values are computed for every head so the cache stays complete.
  """
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    self.qkv = self.param('qkv', _dense_init(cfg), (D, 3, H, K))
    self.out = self.param('out', _dense_init(cfg, residual=True), (H, K, D))
    if cfg.use_bias:
      self.qkv_bias = self.param('qkv_bias', nn.initializers.zeros, (3, H, K))
      self.out_bias = self.param('out_bias', nn.initializers.zeros, (D,))

  def _project(self, x_BxLxD, which, heads=slice(None)):
    """Projections `which` (0 q, 1 k, 2 v; an int or slice) for the given heads."""
    w = self.qkv[:, which][..., heads, :] if isinstance(which, int) else self.qkv[:, which]
    B, L, D = x_BxLxD.shape
    y = jnp.einsum('ND,D...HK->N...HK', x_BxLxD.reshape(B * L, D), w)
    y = y.reshape(B, L, *y.shape[1:])
    if self.cfg.use_bias:
      b = self.qkv_bias[which]
      y += b[..., heads, :] if isinstance(which, int) else b
    return y

  def write_kv(self, x_BxLxD, cache, pos, kv_BxLx2xHxK=None):
    """Keys and values of every head (projected unless given), written into the cache at `pos`
    when there is one; returns (keys, values, new cache)."""
    if kv_BxLx2xHxK is None:
      kv_BxLx2xHxK = self._project(x_BxLxD, slice(1, 3))
    k_BxLxHxK, v_BxLxHxK = kv_BxLx2xHxK[:, :, 0], kv_BxLx2xHxK[:, :, 1]
    if cache is None:
      return k_BxLxHxK, v_BxLxHxK, None
    k = jax.lax.dynamic_update_slice(cache['k'], k_BxLxHxK.astype(cache['k'].dtype), (0, pos, 0, 0))
    v = jax.lax.dynamic_update_slice(cache['v'], v_BxLxHxK.astype(cache['v'].dtype), (0, pos, 0, 0))
    return k, v, {'k': k, 'v': v}

  def __call__(self, x_BxLxD, cache=None, pos=0, heads: activation.Site | None = None):
    L = x_BxLxD.shape[1]
    if heads is None or heads.mask is not None:
      qkv_BxLx3xHxK = self._project(x_BxLxD, slice(0, 3))
      k_BxSxHxK, v_BxSxHxK, new_cache = self.write_kv(x_BxLxD, cache, pos, qkv_BxLx3xHxK[:, :, 1:])
      q_BxLxHxK = qkv_BxLx3xHxK[:, :, 0]
      o_BxLxHxK = _attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, cache is not None, pos, L)
      if heads is not None:  # mask over heads, [H] or per position [L, H]
        o_BxLxHxK = o_BxLxHxK * (heads.mask * heads.scale(heads.mask))[..., None]
      return self._output(o_BxLxHxK, slice(None)), new_cache

    k_BxSxHxK, v_BxSxHxK, new_cache = self.write_kv(x_BxLxD, cache, pos)

    def branch(bucket):
      units, h = heads.units(bucket), heads.width(bucket)
      q_BxLxhxK = self._project(x_BxLxD, 0, units)
      o = _attend(q_BxLxhxK, k_BxSxHxK[:, :, units], v_BxSxHxK[:, :, units], cache is not None,
                  pos, L)
      return self._output(o * heads.scale(h), units)

    return _switch(heads, branch), new_cache

  def _output(self, o_BxLxhxK, units):
    B, L, h, K = o_BxLxhxK.shape
    y_BxLxD = jnp.einsum('NHK,HKD->ND', o_BxLxhxK.reshape(B * L, h, K),
                         self.out[units]).reshape(B, L, -1)
    return y_BxLxD + self.out_bias if self.cfg.use_bias else y_BxLxD


def _attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, cached: bool, pos, L: int):
  if not cached:
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True)
  S = k_BxSxHxK.shape[1]
  mask_LxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(L))[:, None]
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_LxS[None, None])


class MLP(nn.Module):
  """GELU MLP; with an `mlp` site only the active hidden units are computed."""
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    D, F = cfg.embed_dim, cfg.mlp_dim
    self.w_in = self.param('w_in', _dense_init(cfg), (D, F))
    self.w_out = self.param('w_out', _dense_init(cfg, residual=True), (F, D))
    if cfg.use_bias:
      self.b_in = self.param('b_in', nn.initializers.zeros, (F,))
      self.b_out = self.param('b_out', nn.initializers.zeros, (D,))

  def _hidden(self, x_BxLxD, units=slice(None)):
    h = _matmul(x_BxLxD, self.w_in[:, units])
    # Exact (erf) GELU, as nanoGPT / torch.nn.GELU().
    return jax.nn.gelu(h + self.b_in[units] if self.cfg.use_bias else h, approximate=False)

  def _output(self, h_BxLxk, units=slice(None)):
    y = _matmul(h_BxLxk, self.w_out[units])
    return y + self.b_out if self.cfg.use_bias else y

  def __call__(self, x_BxLxD, site: activation.Site | None = None):
    if site is None:
      return self._output(self._hidden(x_BxLxD))
    if site.mask is not None:  # [F] or per position [L, F]
      return self._output(self._hidden(x_BxLxD) * site.mask * site.scale(site.mask))

    def branch(bucket):
      units = site.units(bucket)
      return self._output(self._hidden(x_BxLxD, units) * site.scale(site.width(bucket)), units)

    return _switch(site, branch)


class Block(nn.Module):
  """Pre-LayerNorm residual block. `plan` (one layer of an activation.Plan) says which heads
  and MLP units are on and whether the block runs at all; a skipped block is the identity and,
  with a cache, still writes its keys and values for the token."""
  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    self.ln_1 = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias)
    self.attn = Attention(cfg)
    self.ln_2 = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias)
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
      return nn.cond(on, Block.run, Block.skip, self, *args)
    y_BxLxD, new_cache = self.run(*args)  # a float mask (bernoulli, or per position [L])
    m = jnp.asarray(on).reshape((1, -1, 1) if jnp.ndim(on) else ())
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
    wte_VxD = self.param('wte', _dense_init(cfg), (cfg.vocab_size, cfg.embed_dim))
    wpe_TxD = self.param('wpe', _dense_init(cfg), (cfg.block_size, cfg.embed_dim))
    L = tokens_BxL.shape[1]
    pe_LxD = jax.lax.dynamic_slice_in_dim(wpe_TxD, pos, L) if cache is not None else wpe_TxD[:L]
    x_BxLxD = jnp.take(wte_VxD, tokens_BxL, axis=0) + pe_LxD
    x_BxLxD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD)
    new_cache = [] if cache is not None else None
    for i in range(cfg.num_layers):
      x_BxLxD, layer_cache = Block(cfg, name=f'block_{i}')(
          x_BxLxD, None if cache is None else cache[i], pos, deterministic,
          None if plan is None else plan[i])
      if cache is not None:
        new_cache.append(layer_cache)
    x_BxLxD = nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.use_bias, name='ln_f')(x_BxLxD)
    logits_BxLxV = _matmul(x_BxLxD, wte_VxD.T)
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
