"""A GPT in Flax Linen with an explicit KV cache.

Parameters are declared explicitly (no nn.Dense) so that a sub-width of every matrix can be taken
by slicing, which is how the random activation skips compute.

Shape suffixes: B batch, L tokens in this call, S cache length, D embed (residual) width, H heads,
K head width, F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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


class Attention(nn.Module):
  """Causal multi-head self-attention; with a cache, writes this call's K/V at `pos`."""
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD, cache=None, pos=0):
    cfg = self.cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    w_qkv = self.param('qkv', _dense_init(cfg), (D, 3, H, K))
    w_out = self.param('out', _dense_init(cfg, residual=True), (H, K, D))
    qkv_BxLx3xHxK = jnp.einsum('BLD,DTHK->BLTHK', x_BxLxD, w_qkv)
    if cfg.use_bias:
      qkv_BxLx3xHxK += self.param('qkv_bias', nn.initializers.zeros, (3, H, K))
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    if cache is None:
      o_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True)
      new_cache = None
    else:
      k_BxSxHxK = jax.lax.dynamic_update_slice(cache['k'], k_BxLxHxK.astype(cache['k'].dtype),
                                               (0, pos, 0, 0))
      v_BxSxHxK = jax.lax.dynamic_update_slice(cache['v'], v_BxLxHxK.astype(cache['v'].dtype),
                                               (0, pos, 0, 0))
      L, S = x_BxLxD.shape[1], k_BxSxHxK.shape[1]
      mask_LxS = jnp.arange(S)[None, :] <= (pos + jnp.arange(L))[:, None]
      o_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_LxS[None, None])
      new_cache = {'k': k_BxSxHxK, 'v': v_BxSxHxK}
    y_BxLxD = jnp.einsum('BLHK,HKD->BLD', o_BxLxHxK, w_out)
    if cfg.use_bias:
      y_BxLxD += self.param('out_bias', nn.initializers.zeros, (D,))
    return y_BxLxD, new_cache


class MLP(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    D, F = cfg.embed_dim, cfg.mlp_dim
    w_in = self.param('w_in', _dense_init(cfg), (D, F))
    w_out = self.param('w_out', _dense_init(cfg, residual=True), (F, D))
    h_BxLxF = x_BxLxD @ w_in
    if cfg.use_bias:
      h_BxLxF += self.param('b_in', nn.initializers.zeros, (F,))
    y_BxLxD = jax.nn.gelu(h_BxLxF) @ w_out
    if cfg.use_bias:
      y_BxLxD += self.param('b_out', nn.initializers.zeros, (D,))
    return y_BxLxD


class Block(nn.Module):
  """Pre-LayerNorm residual block."""
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD, cache=None, pos=0, deterministic=True):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    h, new_cache = Attention(cfg, name='attn')(
        nn.LayerNorm(use_bias=cfg.use_bias, name='ln_1')(x_BxLxD), cache, pos)
    x_BxLxD = x_BxLxD + drop(h)
    h = MLP(cfg, name='mlp')(nn.LayerNorm(use_bias=cfg.use_bias, name='ln_2')(x_BxLxD))
    return x_BxLxD + drop(h), new_cache


class GPT(nn.Module):
  """Token + learned position embeddings, blocks, final LayerNorm, weight-tied output head.

  `__call__(tokens_BxL)` is the training/eval forward pass (returns `(logits, None)`);
  with `cache=` and `pos=` it processes tokens at positions pos..pos+L-1 against the cache and
  returns `(logits, new_cache)` (prefill when L > 1, one decode step when L == 1).
  """
  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, cache: Cache | None = None, pos=0, deterministic=True):
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
          x_BxLxD, None if cache is None else cache[i], pos, deterministic)
      if cache is not None:
        new_cache.append(layer_cache)
    x_BxLxD = nn.LayerNorm(use_bias=cfg.use_bias, name='ln_f')(x_BxLxD)
    logits_BxLxV = jnp.einsum('BLD,VD->BLV', x_BxLxD, wte_VxD)
    return logits_BxLxV, new_cache


def flops_per_token(cfg: GPTConfig, context: int | None = None) -> float:
  """Analytic forward FLOPs per token (2 per multiply-add) of the matrix products.

  Attention is counted over the whole `context` (default: block_size) because the XLA kernel
  computes the full causal score matrix and masks it. Element-wise work (LayerNorm, GELU,
  softmax) is left out; tests hold this count against XLA's cost analysis.
  """
  T = context or cfg.block_size
  D, F, V = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  per_layer = 2 * D * 3 * D + 2 * D * D + 2 * 2 * D * F + 2 * 2 * T * D
  return float(cfg.num_layers * per_layer + 2 * D * V)
