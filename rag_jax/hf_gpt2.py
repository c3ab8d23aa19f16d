"""Hugging Face GPT-2 checkpoints <-> rag_jax parameters (both directions, one name table).

A GPT-2 directory as `transformers` saves it: `config.json` (model_type 'gpt2') and
`model.safetensors` (read with `safetensors`, never pickle), names with or without the
'transformer.' prefix. What GPT-2 differs in, and how it maps:

    wte [V, D], wpe [T, D]            -> wte, wpe (learned positions: block_size = n_positions)
    h.i.ln_1 / ln_2 / ln_f            -> block_i/ln_1, block_i/ln_2, ln_f (scale, bias)
    h.i.attn.c_attn  [D, 3D] (Conv1D: -> block_i/attn/query [D, H, K] and key_value [D, 2, H, K]
                      in x out; q|k|v)    (and their biases)
    h.i.attn.c_proj  [D, D]           -> block_i/attn/out [H, K, D], out_bias
    h.i.mlp.c_fc     [D, F]           -> block_i/mlp/w_in, b_in
    h.i.mlp.c_proj   [F, D]           -> block_i/mlp/w_out, b_out
    lm_head (tied to wte)             -> the tied head (an untied one is refused)

GPT-2 has biases everywhere (rag_jax's `use_bias=True`) and the tanh GELU ('gelu_new':
`model.gelu='tanh'`; 'gelu' is the exact one). A rag_jax model written in this layout needs every
head (HF's head width is n_embd / n_head): an export that dropped heads is not representable;
one without biases is written with zero biases (the same function).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from rag_jax import files
from rag_jax import weights
from rag_jax.errors import WorkdirError
from rag_jax.models import gpt

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
TOKENIZER_FILES = ('vocab.json', 'merges.txt')
# HF's activation_function -> model.gelu.
GELUS = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'exact'}
# Buffers some GPT-2 checkpoints carry beside the parameters (the causal mask): not weights.
_BUFFERS = ('.attn.bias', '.attn.masked_bias')


class NotRepresentable(ValueError):
  """A rag_jax model that the GPT-2 layout cannot hold."""


def model_fields(hf_config: dict, path: str = 'config.json') -> dict[str, Any]:
  """The `config.model` fields of a GPT-2 config.json; WorkdirError for another architecture or
  a GPT-2 variant this model does not compute."""
  kind = hf_config.get('model_type')
  if kind != 'gpt2':
    raise WorkdirError(f'{path}: model_type {kind!r} is not a GPT-2 checkpoint; only '
                       "model_type 'gpt2' converts.")
  act = hf_config.get('activation_function', 'gelu_new')
  checks = [
      (act in GELUS, f'activation_function {act!r} (known: {sorted(GELUS)})'),
      (hf_config.get('scale_attn_weights', True), 'scale_attn_weights=false'),
      (not hf_config.get('scale_attn_by_inverse_layer_idx', False),
       'scale_attn_by_inverse_layer_idx=true'),
      (not hf_config.get('add_cross_attention', False), 'cross-attention'),
      (abs(hf_config.get('layer_norm_epsilon', 1e-5) - gpt.LN_EPS) < 1e-12,
       f'layer_norm_epsilon {hf_config.get("layer_norm_epsilon")} (rag_jax uses {gpt.LN_EPS})'),
      (hf_config.get('tie_word_embeddings', True), 'an untied output head'),
  ]
  for ok, what in checks:
    if not ok:
      raise WorkdirError(f'{path}: {what} is not supported by rag_jax\'s GPT.')
  try:
    D, H = int(hf_config['n_embd']), int(hf_config['n_head'])
    fields = {'num_layers': int(hf_config['n_layer']), 'num_heads': H, 'embed_dim': D,
              'mlp_dim': int(hf_config.get('n_inner') or 4 * D),
              'block_size': int(hf_config['n_positions']), 'use_bias': True, 'dropout': 0.0,
              'gelu': GELUS[act]}
    vocab = int(hf_config['vocab_size'])
  except (KeyError, TypeError, ValueError) as e:
    raise WorkdirError(f'{path}: not a complete GPT-2 config ({type(e).__name__}: {e}).') from None
  if D % H:
    raise WorkdirError(f'{path}: n_head {H} does not divide n_embd {D}.')
  return {**fields, 'vocab_size': vocab}


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, CONFIG_FILE)
  try:
    config = files.read_json(path)
  except FileNotFoundError:
    raise WorkdirError(f'{path} does not exist; --hf_dir must be a Hugging Face checkpoint '
                       'directory (config.json and model.safetensors).') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{path} is damaged ({e}).') from None
  if not isinstance(config, dict):
    raise WorkdirError(f'{path} holds {type(config).__name__}, not a model config.')
  return config


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as float32, names without the 'transformer.' prefix."""
  path = os.path.join(hf_dir, WEIGHTS_FILE)
  if not files.isfile(path):
    other = [f for f in ('pytorch_model.bin', 'model.safetensors.index.json', 'tf_model.h5')
             if files.exists(os.path.join(hf_dir, f))]
    hint = (f' (it holds {other[0]}: save it again with save_pretrained(..., '
            'safe_serialization=True); pickled weights are never read)' if other else '')
    raise WorkdirError(f'{path} does not exist{hint}.')
  try:
    raw = weights.read_tensors(path)
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own errors)
    raise WorkdirError(f'{path} cannot be read ({type(e).__name__}: {e}).') from None
  out = {}
  for name, x in raw.items():
    name = name.removeprefix('transformer.')
    if name.endswith(_BUFFERS) and name.startswith('h.'):
      continue
    if x.dtype.kind != 'f':
      raise WorkdirError(f'{path}: {name} is {x.dtype}, not a floating-point weight.')
    out[name] = np.asarray(x, np.float32)
  return out


def from_hf(tensors: dict[str, np.ndarray], fields: dict[str, Any], path: str) -> dict:
  """rag_jax parameters from GPT-2 tensors (`read_tensors`), checked against the shapes of
  `fields` (`model_fields`); WorkdirError naming the first missing or misshapen tensor."""
  L, H, D, F = (fields[k] for k in ('num_layers', 'num_heads', 'embed_dim', 'mlp_dim'))
  K, V, T = D // H, fields['vocab_size'], fields['block_size']
  used = set()

  def get(name, shape):
    if name not in tensors:
      raise WorkdirError(f'{path} has no tensor {name!r}; is this a GPT-2 checkpoint of the '
                         'shape its config.json gives?')
    x = tensors[name]
    if x.shape != shape:
      raise WorkdirError(f'{path}: {name} has shape {x.shape}, but config.json implies {shape}.')
    used.add(name)
    return x

  def ln(prefix):
    return {'scale': get(f'{prefix}.weight', (D,)), 'bias': get(f'{prefix}.bias', (D,))}

  params = {'wte': get('wte.weight', (V, D)), 'wpe': get('wpe.weight', (T, D)),
            'ln_f': ln('ln_f')}
  for i in range(L):
    p = f'h.{i}'
    qkv, qkv_b = get(f'{p}.attn.c_attn.weight', (D, 3 * D)), get(f'{p}.attn.c_attn.bias', (3 * D,))
    w = qkv.reshape(D, 3, H, K)
    b = qkv_b.reshape(3, H, K)
    params[f'block_{i}'] = {
        'ln_1': ln(f'{p}.ln_1'), 'ln_2': ln(f'{p}.ln_2'),
        'attn': {'query': w[:, 0], 'key_value': w[:, 1:], 'query_bias': b[0],
                 'key_value_bias': b[1:],
                 'out': get(f'{p}.attn.c_proj.weight', (D, D)).reshape(H, K, D),
                 'out_bias': get(f'{p}.attn.c_proj.bias', (D,))},
        'mlp': {'w_in': get(f'{p}.mlp.c_fc.weight', (D, F)),
                'b_in': get(f'{p}.mlp.c_fc.bias', (F,)),
                'w_out': get(f'{p}.mlp.c_proj.weight', (F, D)),
                'b_out': get(f'{p}.mlp.c_proj.bias', (D,))}}
  head = tensors.get('lm_head.weight')
  if head is not None:
    used.add('lm_head.weight')
    if head.shape != (V, D) or not np.array_equal(head, params['wte']):
      raise WorkdirError(f'{path}: lm_head.weight differs from wte.weight; rag_jax ties the '
                         'output head to the embedding.')
  extra = sorted(set(tensors) - used)
  if extra:
    raise WorkdirError(f'{path} holds tensors a GPT-2 of {L} layers has not: {extra[:4]}; is '
                       'config.json the one saved with these weights?')
  return params


def to_hf(params: dict, cfg: gpt.GPTConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(GPT-2 tensors named as `GPT2LMHeadModel.save_pretrained` names them, its config.json) of
  a rag_jax model; NotRepresentable when the layout cannot hold it."""
  D, H, K, F = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  if cfg.per_layer:
    raise NotRepresentable('its blocks keep different heads or MLP units (a per-layer plan): '
                           "GPT-2's config holds one n_head and n_inner for every block.")
  if H * K != D:
    raise NotRepresentable(
        f'{H} heads of width {K} ({H * K}) do not fill the width {D}: GPT-2 heads are '
        'n_embd / n_head wide (an export that drops heads is not representable; MLP-unit and '
        'layer fractions are).')
  p = {k: np.asarray(v, np.float32) for k, v in weights.flatten(params).items()}
  zeros = lambda *shape: np.zeros(shape, np.float32)
  bias = lambda name, *shape: p.get(name, zeros(*shape))
  t = {'transformer.wte.weight': p['wte'], 'transformer.wpe.weight': p['wpe'],
       'transformer.ln_f.weight': p['ln_f/scale'], 'transformer.ln_f.bias': bias('ln_f/bias', D)}
  for i in range(cfg.num_layers):
    b, h = f'block_{i}/', f'transformer.h.{i}.'
    q, kv = p[b + 'attn/query'].reshape(D, 1, D), p[b + 'attn/key_value'].reshape(D, 2, D)
    qb = bias(b + 'attn/query_bias', H, K).reshape(1, D)
    kvb = bias(b + 'attn/key_value_bias', 2, H, K).reshape(2, D)
    t.update({
        h + 'ln_1.weight': p[b + 'ln_1/scale'], h + 'ln_1.bias': bias(b + 'ln_1/bias', D),
        h + 'ln_2.weight': p[b + 'ln_2/scale'], h + 'ln_2.bias': bias(b + 'ln_2/bias', D),
        h + 'attn.c_attn.weight': np.concatenate([q, kv], 1).reshape(D, 3 * D),
        h + 'attn.c_attn.bias': np.concatenate([qb, kvb], 0).reshape(3 * D),
        h + 'attn.c_proj.weight': p[b + 'attn/out'].reshape(D, D),
        h + 'attn.c_proj.bias': bias(b + 'attn/out_bias', D),
        h + 'mlp.c_fc.weight': p[b + 'mlp/w_in'], h + 'mlp.c_fc.bias': bias(b + 'mlp/b_in', F),
        h + 'mlp.c_proj.weight': p[b + 'mlp/w_out'],
        h + 'mlp.c_proj.bias': bias(b + 'mlp/b_out', D),
    })
  gelu = {'tanh': 'gelu_new', 'exact': 'gelu'}[cfg.gelu]
  config = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
            'vocab_size': cfg.vocab_size, 'n_positions': cfg.block_size, 'n_embd': D,
            'n_layer': cfg.num_layers, 'n_head': H, 'n_inner': F,
            'activation_function': gelu, 'layer_norm_epsilon': gpt.LN_EPS,
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
            'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
            'reorder_and_upcast_attn': False, 'tie_word_embeddings': True, 'use_cache': True,
            'initializer_range': 0.02, 'bos_token_id': None, 'eos_token_id': None}
  return {k: np.ascontiguousarray(v) for k, v in t.items()}, config


def save(params: dict, cfg: gpt.GPTConfig, directory: str) -> str:
  """Writes `directory`/config.json and model.safetensors in GPT-2's layout; returns the dir."""
  tensors, config = to_hf(params, cfg)
  files.makedirs(directory)
  weights.write_tensors(os.path.join(directory, WEIGHTS_FILE), tensors, {'format': 'pt'})
  files.write_json(os.path.join(directory, CONFIG_FILE), config)
  return directory
