"""Take a sub-model away: a fixed fraction of a trained run as a standalone, smaller model.

    python -m rag_jax.export --workdir=W --active_fraction=0.5 --out=DIR [--int8]
    python -m rag_jax.export --workdir=W --plan=W/plan_0.625.json --out=DIR [--int8]

The sub-model `evaluate --active_fraction=a` scores (nested widths: the first heads, MLP units and
blocks) is sliced out of the newest checkpoint into a dense model of its own size: only the kept
heads' query, key/value and output projections, the kept MLP units, the kept blocks. It never
reads the other heads' keys and values, so its KV cache is smaller too. DIR holds:

    DIR/config.json        the parent's run config with the sub-model's shape (num_heads,
                           head_dim explicit, mlp_dim, num_layers) and the activation off
    DIR/tokenizer.json     the parent's tokenizer
    DIR/model.safetensors  the weights, named by their path ('block_0/attn/query'); with --int8
                           every matrix is int8 with a float32 scale per output channel
                           ('NAME:int8', 'NAME:scale'), the rest float32
    DIR/export.json        the parent workdir and step, the fraction, the kept units per layer,
                           parameters and bytes
    DIR/hf/                the same model in Hugging Face's GPT-2 layout (config.json,
                           model.safetensors; vocab.json and merges.txt for a BPE tokenizer),
                           for `GPT2LMHeadModel.from_pretrained(DIR/hf)`, where that layout holds
                           it: every head kept (GPT-2's head width is n_embd / n_head: MLP-unit
                           and layer fractions are representable, head fractions not), float
                           weights (not with --int8). export.json says which.

`runs.load_run(DIR)` (so `evaluate` and `sample`) reads such a directory as it reads a workdir.
`--plan` exports a per-layer plan of `rag_jax.search` (each block its own heads and MLP units):
its config lists them (model.layer_heads, model.layer_mlp_dims); GPT-2's layout cannot hold it.
Only the `nested` structure exports: `random` and `bernoulli` choose their units per batch from
keys, so no one dense model equals what their parent scores.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from absl import app, flags
import jax
import ml_collections
import numpy as np

from rag_jax import activation
from rag_jax import cli
from rag_jax import files
from rag_jax import hf_gpt2
from rag_jax import plan as plan_lib
from rag_jax import runs
from rag_jax import weights as weights_lib
from rag_jax import workdir as workdir_lib
from rag_jax.data import tokenizers
from rag_jax.errors import WorkdirError
from rag_jax.models import gpt
from rag_jax.models import submodel as submodel_lib

HF_DIR = 'hf'  # the Hugging Face GPT-2 layout, inside an export


def check_out(out: str, record: dict[str, Any]) -> None:
  """`out` may be new, empty, or a directory written earlier by the same call (the keys of
  `record` agree): anything else is refused and nothing in it changes."""
  if not files.exists(out):
    return
  if not files.isdir(out):
    raise WorkdirError(f'--out {out} is a file.')
  if not files.listdir(out):
    return
  if not weights_lib.is_export(out):
    raise WorkdirError(f'--out {out} holds other files; give a new directory.')
  old = files.read_json(os.path.join(out, weights_lib.EXPORT_FILE))
  if {k: old.get(k) for k in record} != record:
    source = old.get('parent') or old.get('hf_dir')
    at = old.get('active_fraction') or old.get('plan')
    raise WorkdirError(f'--out {out} holds another export ({source} step {old.get("step")} at '
                       f'{at}, int8 {old.get("int8")}); give a new directory. Nothing was '
                       'changed.')


def read_plan(path: str, act: ml_collections.ConfigDict, cfg: gpt.GPTConfig
              ) -> dict[str, list[int]]:
  """The per-layer buckets of a plan file (`rag_jax.search`'s JSON: {"buckets": {site: [one
  0-based bucket per block]}}), checked against the run: one ValueError naming what is wrong."""
  try:
    buckets = files.read_json(path)['buckets']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'--plan {path}: not a plan file (rag_jax.search writes one: JSON with '
                     f'"buckets": {{site: [bucket per block]}}): {e}') from None
  sites = activation.parse_sites(act.sites)
  if not isinstance(buckets, dict) or not buckets:
    raise ValueError(f'--plan {path}: "buckets" must map sites to lists, got {buckets!r}.')
  for site, values in buckets.items():
    if site not in activation.PER_LAYER_SITES or site not in sites:
      raise ValueError(f'--plan {path}: site {site!r} is not a width site of this run '
                       f'(its sites: {act.sites}).')
    if (not isinstance(values, list) or len(values) != cfg.num_layers or
        not all(isinstance(b, int) and 0 <= b < act.buckets for b in values)):
      raise ValueError(f'--plan {path}: {site} needs one bucket in 0..{act.buckets - 1} for each '
                       f'of the {cfg.num_layers} blocks, got {values!r}.')
  if act.structure != 'nested':
    raise ValueError(f"the run's activation structure is {act.structure!r}: only nested widths "
                     'export.')
  return {site: [int(b) for b in values] for site, values in buckets.items()}


def export(workdir: str, fraction: float | None, out: str, int8: bool = False,
           plan_file: str | None = None, config_overrides: dict | None = None) -> dict[str, Any]:
  """Writes the sub-model of `workdir` at `fraction` (or, with `plan_file`, at the per-layer
  widths of a `rag_jax.search` plan) into `out`; returns export.json's content. `out` must be
  new or an earlier export of the same parent, fraction (plan) and int8 setting.
  `config_overrides`: changes to the parent's saved config (runs.load_run), e.g. its dtype."""
  if files.absolute(out) == files.absolute(workdir):
    raise ValueError('--out must not be the parent workdir.')
  config, tokenizer, model, params, step = runs.load_run(workdir, config_overrides)
  cfg, act = model.cfg, config.activation
  record = {'parent': files.absolute(workdir), 'step': int(step), 'int8': bool(int8),
            'sites': act.sites}
  if cfg.per_layer and (plan_file or fraction < 1):
    raise ValueError(f'{workdir} already holds blocks of their own widths (a per-layer export): '
                     'it exports whole (--active_fraction=1) only.')
  if plan_file:
    buckets = read_plan(plan_file, act, cfg)
    record.update(active_fraction=None, plan=files.absolute(plan_file), buckets=buckets)
    check_out(out, record)
    plan = activation.plan_of(buckets, act, cfg, static=True)
  else:
    submodel_lib.check_fraction(act, cfg, fraction)
    record['active_fraction'] = float(fraction)
    check_out(out, record)
    plan = (activation.make_plan(jax.random.key(0), act, cfg, fraction) if fraction < 1 else
            tuple(plan_lib.LayerPlan() for _ in range(cfg.num_layers)))
  sub, shape, kept = submodel_lib.slice_params(jax.device_get(params), cfg, plan)
  workdir_lib.check_writable(out, create=True)
  sub_config = ml_collections.ConfigDict(config.to_dict())
  sub_config.model.update(shape)
  # The export is a dense model; its nested widths are the parent's narrower buckets (an export
  # at 0.5 of 4 buckets keeps 2), so `evaluate --active_fractions` still truncates it in steps.
  sub_act = sub_config.activation
  sub_act.enabled, sub_act.lam = False, 0.0
  if plan_file:
    sub_act.buckets = 1  # per-layer widths: no one truncation of them (evaluate at a = 1)
  elif {'mlp', 'heads'} & set(activation.parse_sites(act.sites)):
    sub_act.buckets = max(1, round(fraction * act.buckets))
  weights = weights_lib.save(sub, out, int8)
  workdir_lib.save_config(sub_config, out)
  tokenizers.save(tokenizer, os.path.join(out, workdir_lib.TOKENIZER_FILE))
  sub_cfg = runs.make_model(sub_config, tokenizer.vocab_size).cfg
  record.update(huggingface=write_hf(sub, sub_cfg, tokenizer, out, int8), model=shape, blocks=kept,
                parameters=int(sum(np.size(x) for x in jax.tree.leaves(sub))),
                parent_parameters=int(sum(np.size(x) for x in jax.tree.leaves(params))),
                bytes=files.getsize(weights))
  files.write_json(os.path.join(out, weights_lib.EXPORT_FILE), record)
  return record


def write_hf(params: dict, cfg: gpt.GPTConfig, tokenizer, out: str, int8: bool) -> dict[str, Any]:
  """The sub-model also in Hugging Face's GPT-2 layout, in `out`/hf (float32 config.json +
  model.safetensors, and vocab.json + merges.txt for a BPE tokenizer) where that layout holds
  it; returns what was written, or why not."""
  if int8:
    return {'written': False, 'why': 'int8 weights: GPT-2\'s layout is float (export without '
            '--int8 for it)'}
  try:
    hf_gpt2.save(params, cfg, os.path.join(out, HF_DIR))
  except hf_gpt2.NotRepresentable as e:
    return {'written': False, 'why': str(e)}
  record = {'written': True, 'dir': HF_DIR,
            'tokenizer': isinstance(tokenizer, tokenizers.BPETokenizer)}
  if record['tokenizer']:
    tokenizer.save_files(os.path.join(out, HF_DIR))
  else:
    record['why_no_tokenizer'] = (f'the run\'s {tokenizer.kind} tokenizer has no GPT-2 '
                                  'tokenizer files; ids are the same as in rag_jax')
  return record


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.', required=True)
  flags.DEFINE_float('active_fraction', 1.0, 'The fixed fraction to export (a width the run '
                     'computes: a bucket, or whole blocks for the layers site).')
  flags.DEFINE_string('out', None, 'Directory to write the sub-model into.', required=True)
  flags.DEFINE_bool('int8', False, 'Store matrices as int8 with per-channel float32 scales.')
  flags.DEFINE_string('plan', None, 'A per-layer plan (rag_jax.search\'s JSON) to export '
                      'instead of one --active_fraction: blocks of their own widths.')


def main(argv):
  del argv
  workdir_lib.quiet_logs()
  f = flags.FLAGS
  try:
    if f.plan and f['active_fraction'].present:
      raise ValueError('give --active_fraction or --plan, not both.')
    record = export(f.workdir, f.active_fraction, f.out, f.int8, f.plan, cli.run_overrides())
  except cli.ERRORS as e:
    sys.exit(f'error: {e}')
  hf = record['huggingface']
  print(f"wrote {f.out}: {record['parameters']:,} parameters "
        f"({record['parameters'] / record['parent_parameters']:.3f} of the parent), "
        f"{record['bytes']:,} bytes, model {record['model']}; Hugging Face GPT-2 layout: "
        + (f"{os.path.join(f.out, hf['dir'])}" if hf['written'] else f"not written ({hf['why']})"))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
