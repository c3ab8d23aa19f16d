# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # rag_jax on Colab: install, train, sample, plot
#
# Trains the small random-activation model (`configs/ra_shakespeare_char.py:smoke`, two layers,
# 60 steps: about a minute on a CPU runtime) on tiny_shakespeare, which ships with the package
# (nothing is downloaded), samples from it at the full width and at half width, and plots its
# losses. For a real run, drop `:smoke` (2000 steps, about 10 minutes on a CPU, less on a GPU).
#
# **On Colab**, the first cell clones the repository (set `REPO` to the git URL of your copy)
# and installs it. Colab already has TensorFlow, which TFDS needs to build the dataset, so the
# `tf` extra is not installed there. On a GPU runtime also install JAX's CUDA build
# (`%pip install -q "jax[cuda12]"`). **Inside a checkout** (after `make install`), the first
# cell finds it and installs nothing: `jupyter execute notebooks/colab_quickstart.ipynb` runs
# the whole notebook headless, as the tests do.

# %% tags=["colab"]
# Install: on Colab, fetch and install rag_jax; inside a checkout, use the checkout as it is.
import pathlib
import sys

REPO = ''  # on Colab: the git URL of your copy of rag_jax
CHECKOUT = next((p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
                 if (p / 'pyproject.toml').exists() and (p / 'rag_jax').is_dir()), None)
if CHECKOUT is None:
  if 'google.colab' not in sys.modules or not REPO:
    raise SystemExit('Run this notebook inside a rag_jax checkout, or on Colab with REPO set '
                     'to the git URL of rag_jax.')
  # !git clone -q {REPO} rag_jax
  # %cd rag_jax
  # %pip install -q -e .

# %%
import os
import pathlib

from IPython.display import Image, display

# The repository's root (this notebook lives in notebooks/).
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
            if (p / 'configs' / 'ra_shakespeare_char.py').exists())
os.chdir(ROOT)
WORKDIR = os.environ.get('RAG_COLAB_WORKDIR', 'runs/colab_smoke')

# %% [markdown]
# ## Train
# `train_and_evaluate` is what `python -m rag_jax.train` runs: it resumes from the newest
# checkpoint in `WORKDIR` if there is one, logs to `metrics.jsonl` and TensorBoard, and returns
# the last logged metrics.

# %%
from rag_jax import configuration
from rag_jax import train

config = configuration.load_config('configs/ra_shakespeare_char.py', 'smoke')
last = train.train_and_evaluate(config, WORKDIR)
print({k: round(v, 4) for k, v in last.items() if k in ('train_loss', 'eval_loss')})

# %% [markdown]
# ## Sample at the full width and at half width
# The same trained model runs at any of its widths; `active_fraction=0.5` computes half of the
# MLP units and heads.

# %%
from rag_jax import runs
from rag_jax import sample

run = runs.load_run(WORKDIR)
for fraction in (1.0, 0.5):
  out = sample.sample(run.params, run.config, 'ROMEO:', tokenizer=run.tokenizer,
                      num_tokens=80, active_fraction=fraction, seed=0)
  print(f'a = {fraction}:', out.text[0], sep='\n', end='\n\n')

# %% [markdown]
# ## Losses
# `python -m rag_jax.plot --workdirs=A,B` draws the same picture for several runs.

# %%
from rag_jax import plot

display(Image(plot.plot([WORKDIR], os.path.join(WORKDIR, 'loss.png'))))
