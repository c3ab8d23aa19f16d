"""The analytic FLOP count of a forward pass, per token, at any active fraction.

The tests hold it within 5% of XLA's cost analysis of each compiled static width, so it is the
x-axis of every quality-compute curve (`evaluate`'s `flops_per_token`).
"""
from __future__ import annotations

from rag_jax.models import gpt

# XLA's cost-analysis count for one GELU: the exact one's erf lowers to a rational polynomial;
# GPT-2's tanh form counts its multiplies and adds (tanh itself counts none).
GELU_FLOPS = {'exact': 64, 'tanh': 8}


def flops_per_token(cfg: gpt.GPTConfig, context: int | None = None, mlp: float = 1.0,
                    heads: float = 1.0, layers: float = 1.0, decode: bool = False) -> float:
  """Analytic forward FLOPs per token (2 per multiply-add) of the matrix products.

  `mlp`, `heads`, `layers`: the fraction of MLP units, heads and blocks that are computed
  (`activation.compute_fractions`). Keys and values are computed for every head of a running
  block; a skipped block costs nothing in the parallel forward pass, and only its keys and
  values when `decode` (it still writes them into the cache). Attention is counted over the
  whole `context` (default: block_size) because the XLA kernel computes the full causal score
  matrix and masks it. Of the element-wise work only the GELU counts (GELU_FLOPS per hidden
  unit); LayerNorm, softmax and residual adds (under 1%) are left out.
  """
  T = context or cfg.block_size
  D, V = cfg.embed_dim, cfg.vocab_size
  total = 0.0
  for l in range(cfg.num_layers):  # blocks of their own widths (GPTConfig.layer_heads, ...)
    F, A = cfg.mlp_dim_of(l), cfg.heads_of(l) * cfg.head_dim
    kv = 2 * D * 2 * A
    q_attn_out = 2 * D * A + 2 * 2 * T * A + 2 * A * D
    per_layer = kv + heads * q_attn_out + mlp * (2 * 2 * D * F + GELU_FLOPS[cfg.gelu] * F)
    total += layers * per_layer + (1 - layers) * (kv if decode else 0)
  return float(total + 2 * D * V)
