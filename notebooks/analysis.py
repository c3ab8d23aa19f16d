# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Ablation analysis: quality against compute
#
# Reads a sweep directory written by `experiments/sweep.py` (one workdir per run, each with
# `config.json` and `eval_curve.json`) and shows: the table of every run, the loss against FLOPs
# per token with its Pareto front and the dense baseline, the loss over (α, β) at each λ, and a
# few lines sampled from the best run at a = 1 and a = 0.5.
#
# The sweep directory comes from the environment variable `RAG_SWEEP_DIR`, else the `SWEEP_DIR`
# below (relative paths are from the repository root). See `docs/ablations.md`.
#
# This file is the jupytext pair of `analysis.ipynb`: edit either and run
# `jupytext --sync notebooks/analysis.py`; commit the `.ipynb` without outputs.

# %% tags=["parameters"]
import os

SWEEP_DIR = os.environ.get('RAG_SWEEP_DIR', 'runs/alpha_beta_lambda')
SPLIT = 'validation'        # evaluation entries to show
FRACTION = 0.5              # the budget at which "best" is chosen
PROMPT = 'ROMEO:'
NUM_TOKENS = 200
SEED = 0                    # as `python -m rag_jax.sample --seed=0`

# %%
# %matplotlib inline
import pathlib
import sys

from IPython.display import display
import pandas as pd

ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
            if (p / 'experiments' / 'collect.py').exists())
sys.path.insert(0, str(ROOT / 'experiments'))
import collect  # noqa: E402  (experiments/collect.py)

from rag_jax import runs  # noqa: E402
from rag_jax import sample as sample_lib  # noqa: E402

sweep_dir = pathlib.Path(SWEEP_DIR)
sweep_dir = sweep_dir if sweep_dir.is_absolute() else ROOT / sweep_dir
pd.set_option('display.width', 200)
pd.set_option('display.max_columns', 30)

# %% [markdown]
# ## The table
#
# One row per run: the loss at each fixed active fraction a, and under the `random` policy (a
# fresh draw at every position) with its mean active fraction. Below it, the long table that
# `collect.py` writes to `results.csv`.

# %%
table = collect.load_table(str(sweep_dir))
if table.attrs['incomplete']:
  print('not finished, left out:', ', '.join(table.attrs['incomplete']))
display(collect.summary(table, SPLIT))
display(table.head(8))

# %% [markdown]
# ## Quality against compute
#
# Every run's loss at a = 1, 0.75, 0.5, 0.25 against its FLOPs per token (lines), the `random`
# policy (diamonds), the Pareto front (red), and the dense model truncated to the same widths
# (black, dashed): the baseline a random-activation run has to beat.

# %%
display(collect.plot_pareto(table, SPLIT))

# %% [markdown]
# ## Loss over (α, β) at each λ
#
# At a = 1 (does training with random activation cost the full model?) and a = 0.5 (what does
# half the network give?).

# %%
heatmaps = collect.plot_heatmaps(table, split=SPLIT)
if heatmaps is None:
  print('This sweep does not vary (alpha, beta); no heatmaps.')
else:
  display(heatmaps)

# %% [markdown]
# ## The best run at a = 0.5, and what it costs at a = 1

# %%
best = collect.best_at(table, FRACTION, SPLIT)
print(f"best at a = {FRACTION:g}: {best['run']}: loss {best['loss']:.4f} "
      f"(dense truncated to a = {FRACTION:g}: {best['dense_loss']:.4f})")
print(f"the same run at a = 1: {best['loss@1']:.4f} (dense: {best['dense_loss@1']:.4f})")

# %% [markdown]
# ## Samples from the best run
#
# The same prompt and key at the full width and at half the width (a fixed fraction at every
# time step). Keys as in `python -m rag_jax.sample --seed=SEED`.

# %%
config, tokenizer, _, params, step = runs.load_run(str(sweep_dir / best['run']))
for a in (1.0, FRACTION):
  out = sample_lib.sample(params, config, PROMPT, tokenizer=tokenizer, num_tokens=NUM_TOKENS,
                          seed=SEED, policy='fixed', active_fraction=a)
  print(f'--- {best["run"]} (step {step}), a = {a:g}: {out.tokens_per_sec:.0f} tokens/s ---')
  print(out.text[0])
