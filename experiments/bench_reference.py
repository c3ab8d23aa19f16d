"""rag_jax's dense train step against a PyTorch implementation of the same model and step.

    pip install -e '.[bench]'     # torch, for this benchmark only (not a dependency of rag_jax)
    python experiments/bench_reference.py --out=results/bench_reference.json \
        [--config=configs/shakespeare_char.py] [--steps=20] [--rounds=5] [--no_compile]

The PyTorch side is our own code, written as a PyTorch user would write this GPT (nanoGPT's
layout: a fused query/key/value `nn.Linear`, `F.scaled_dot_product_attention`, exact GELU,
tied output head, pre-LayerNorm without biases) and trained with the same step: float32,
mean cross-entropy, global-norm clipping, AdamW (betas, epsilon, decoupled weight decay on the
matrices and embeddings only) on the same warmup-cosine schedule. It starts from rag_jax's
initial parameters, and before anything is timed one step of each on the same batch is compared
(loss, gradient norm and updated parameters: `equivalence` in the JSON), so the two programs are
known to compute the same thing.

Timed, interleaved in one process (so that load from other processes hits all alike): rag_jax's
jitted step as `python -m rag_jax.train` runs it (`train.jit_train_step` over the mesh, on the
CPU devices of `config.mesh.cpu_devices`: one per core by default, so the batch is split over
the cores as PyTorch's threads split each operation), PyTorch eager, and PyTorch with
`torch.compile` (the model's forward and backward; `--nocompile` skips it), each on the same
fixed batches of random tokens, `--steps` steps per round and `--rounds` rounds. Medians and
ratios go to the JSON.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import bench_common

from rag_jax import cli
from rag_jax import configuration
from rag_jax import files
from rag_jax import runs
from rag_jax import sharding
from rag_jax import train
from rag_jax import workdir as workdir_lib

_CONFIG = flags.DEFINE_string('config', 'configs/shakespeare_char.py', 'Model and optimizer.')
_VOCAB = flags.DEFINE_integer('vocab_size', 65, "Vocabulary (65: tiny_shakespeare's characters).")
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per program and round.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps per program after compilation.')
_COMPILE = flags.DEFINE_bool('compile', True, 'Also time torch.compile (inductor).')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, "JAX CPU devices; 0: the config's config.mesh.cpu_devices (0 = one per "
    'core, what `python -m rag_jax.train` uses).')
_THREADS = flags.DEFINE_integer('threads', 0, 'torch threads; 0: torch\'s default (the cores).')
_OUT = flags.DEFINE_string('out', None, 'JSON output.', required=True)


def torch_gpt(cfg, torch):
  """nanoGPT's model (no dropout) for the shapes of a rag_jax `GPTConfig`."""
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      D, HK, Fh = cfg.embed_dim, cfg.attn_dim, cfg.mlp_dim
      self.ln_1 = nn.LayerNorm(D, bias=cfg.use_bias)
      self.c_attn = nn.Linear(D, 3 * HK, bias=cfg.use_bias)
      self.c_proj = nn.Linear(HK, D, bias=cfg.use_bias)
      self.ln_2 = nn.LayerNorm(D, bias=cfg.use_bias)
      self.c_fc = nn.Linear(D, Fh, bias=cfg.use_bias)
      self.mlp_proj = nn.Linear(Fh, D, bias=cfg.use_bias)

    def forward(self, x):
      B, L, _ = x.shape
      H, K = cfg.num_heads, cfg.head_dim
      q, k, v = self.c_attn(self.ln_1(x)).split(H * K, dim=2)
      q, k, v = (t.view(B, L, H, K).transpose(1, 2) for t in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.c_proj(y.transpose(1, 2).reshape(B, L, H * K))
      return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

  class GPT(nn.Module):

    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
      self.wpe = nn.Embedding(cfg.block_size, cfg.embed_dim)
      self.blocks = nn.ModuleList([Block() for _ in range(cfg.num_layers)])
      self.ln_f = nn.LayerNorm(cfg.embed_dim, bias=cfg.use_bias)

    def forward(self, idx, targets):
      x = self.wte(idx) + self.wpe.weight[:idx.shape[1]]
      for block in self.blocks:
        x = block(x)
      logits = self.ln_f(x) @ self.wte.weight.T
      return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

  return GPT()


def load_jax_params(model, params, torch) -> None:
  """Copies rag_jax parameters into `torch_gpt`'s modules (Linear weights are [out, in])."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  D = model.wte.weight.shape[1]
  with torch.no_grad():
    model.wte.weight.copy_(t(params['wte']))
    model.wpe.weight.copy_(t(params['wpe']))
    model.ln_f.weight.copy_(t(params['ln_f']['scale']))
    for i, block in enumerate(model.blocks):
      p = params[f'block_{i}']
      a, m = p['attn'], p['mlp']
      q = np.asarray(a['query']).reshape(D, -1)
      kv = np.asarray(a['key_value'])
      k, v = kv[:, 0].reshape(D, -1), kv[:, 1].reshape(D, -1)
      block.c_attn.weight.copy_(t(np.concatenate([q, k, v], axis=1).T))
      block.c_proj.weight.copy_(t(np.asarray(a['out']).reshape(-1, D).T))
      block.c_fc.weight.copy_(t(np.asarray(m['w_in']).T))
      block.mlp_proj.weight.copy_(t(np.asarray(m['w_out']).T))
      block.ln_1.weight.copy_(t(p['ln_1']['scale']))
      block.ln_2.weight.copy_(t(p['ln_2']['scale']))


class TorchStep:
  """One training step of `torch_gpt`: loss, backward, clipping, AdamW, the lr schedule."""

  def __init__(self, config, model, lrs, torch, compile_model: bool):
    o = config.opt
    self.torch, self.model, self.lrs, self.clip = torch, model, lrs, o.grad_clip
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': o.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    kw = {'fused': True} if _fused_ok(torch) else {}
    self.opt = torch.optim.AdamW(groups, lr=float(lrs[0]), betas=(o.b1, o.b2), eps=1e-8, **kw)
    self.fused = bool(kw)
    self.forward = torch.compile(model) if compile_model else model
    self.step_no = 0

  def __call__(self, idx, targets):
    for group in self.opt.param_groups:  # optax evaluates the schedule at the update's count
      group['lr'] = float(self.lrs[min(self.step_no, len(self.lrs) - 1)])
    loss = self.forward(idx, targets)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip or math.inf)
    self.opt.step()
    self.step_no += 1
    return loss.detach(), norm


def _fused_ok(torch) -> bool:
  try:
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], fused=True).step()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def check_equivalence(config, vocab_size: int, torch) -> dict:
  """One step of rag_jax and of `torch_gpt` from the same parameters on the same batch."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.opt.warmup_steps = 0  # the schedule's first learning rate is then the peak, not 0
  model = runs.make_model(config, vocab_size)
  tx = runs.make_optimizer(config)
  state = runs.init_state(model, tx, jax.random.key(0), config)
  B, T = config.batch_size, config.model.block_size
  batch = np.random.default_rng(0).integers(0, vocab_size, (B, T + 1)).astype(np.int32)
  tm = torch_gpt(model.cfg, torch)
  load_jax_params(tm, state.params, torch)
  lrs = np.asarray(runs.make_lr_schedule(config)(np.arange(config.num_steps + 1)))
  step = TorchStep(config, tm, lrs, torch, compile_model=False)
  new_state, metrics = jax.jit(train.make_train_step(model, tx, config.activation))(
      state, jnp.asarray(batch), jax.random.key(1))
  t = torch.from_numpy(batch.astype(np.int64))
  loss, norm = step(t[:, :-1], t[:, 1:])
  after = torch_gpt(model.cfg, torch)
  load_jax_params(after, new_state.params, torch)
  with torch.no_grad():
    diff = max(float((a - b).abs().max()) for a, b in zip(tm.parameters(), after.parameters()))
  return {'loss_rag_jax': float(metrics['train_loss']), 'loss_torch': float(loss),
          'grad_norm_rag_jax': float(metrics['grad_norm']), 'grad_norm_torch': float(norm.detach()),
          'max_abs_param_diff_after_step': diff, 'learning_rate': float(lrs[0])}


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  workdir_lib.quiet_logs()
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  config = bench_common.load_config(_CONFIG.value)
  config.activation.enabled = False
  if _CPU_DEVICES.value:
    config.mesh.cpu_devices = _CPU_DEVICES.value
  configuration.validate(config)
  sharding.set_cpu_devices(config)  # as `python -m rag_jax.train` does
  if config.dtype != 'float32' or config.model.dropout:
    raise app.UsageError('the reference is float32 without dropout; set the config so')
  V, B, T = _VOCAB.value, config.batch_size, config.model.block_size

  equivalence = check_equivalence(config, V, torch)
  print('equivalence:', equivalence, flush=True)

  # rag_jax, as train.py builds its step; both sides cycle through the same 8 batches.
  jax_step = bench_common.TrainStep(config, V, num_batches=8, seed=1)
  compile_s = {'rag_jax': jax_step.compile_s}

  torch_batches = [torch.from_numpy(b.astype(np.int64)) for b in jax_step.host_batches]
  lrs = np.asarray(runs.make_lr_schedule(config)(np.arange(config.num_steps + 1)))
  programs = {}
  variants = [('torch_eager', False)] + ([('torch_compile', True)] if _COMPILE.value else [])
  for name, compiled in variants:
    tm = torch_gpt(jax_step.model.cfg, torch)
    load_jax_params(tm, jax_step.state.params, torch)
    programs[name] = TorchStep(config, tm, lrs, torch, compiled)
    t0 = time.perf_counter()
    b = torch_batches[0]
    programs[name](b[:, :-1], b[:, 1:])  # compiles (torch.compile is lazy)
    compile_s[name] = time.perf_counter() - t0

  def run_torch(step):
    def f(i):
      b = torch_batches[i % len(torch_batches)]
      step(b[:, :-1], b[:, 1:])
    return f

  runners = {'rag_jax': lambda i: jax_step.run(1, record=False),
             **{k: run_torch(v) for k, v in programs.items()}}
  for fn in runners.values():
    for i in range(_WARMUP.value):
      fn(i)
  ms = {k: [] for k in runners}
  for _ in range(_ROUNDS.value):
    for name, fn in runners.items():
      for i in range(_STEPS.value):
        t0 = time.perf_counter()
        fn(i)
        ms[name].append(1e3 * (time.perf_counter() - t0))
  stats = {k: bench_common.stats(v) for k, v in ms.items()}
  fastest_torch = min((k for k in stats if k != 'rag_jax'), key=lambda k: stats[k]['median'])
  result = {
      'config': _CONFIG.value, 'model': dict(config.model), 'batch_size': B, 'context': T,
      'vocab_size': V, 'dtype': 'float32', 'devices_in_mesh': len(jax.devices()),
      **bench_common.environment(),
      'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
      'torch_adamw_fused': programs['torch_eager'].fused,
      'equivalence': equivalence, 'compile_s': compile_s, 'step_ms': stats,
      'ratio_rag_jax_over': {k: stats['rag_jax']['median'] / stats[k]['median']
                             for k in stats if k != 'rag_jax'},
      'fastest_torch': fastest_torch,
      'ratio_vs_fastest_torch': stats['rag_jax']['median'] / stats[fastest_torch]['median'],
      'load_average_1_5_15min_at_end': os.getloadavg(),
      'peak_host_rss_mib': bench_common.peak_rss_mib(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  files.write_json(_OUT.value, result)
  print(json.dumps(result, indent=2))
  print('step ms (median): ' + ', '.join(f'{k} {v["median"]:.2f}' for k, v in stats.items())
        + f'; rag_jax / {fastest_torch} = {result["ratio_vs_fastest_torch"]:.2f}x', file=sys.stderr)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_output)
