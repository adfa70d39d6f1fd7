# Two commands on a fresh machine: `make demo` (install + pre-train on embedded data) and
# `make test` (install + test suite). Both create .venv/ at the repo root on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# DeepSpeed compiles a few C++ ops on first use: cache them per checkout, never in git.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup setup-lint lint format demo demo-video demo-probe test test-slow test-gpu gpu-check clean

setup: $(STAMP)

# torch/torchvision are pinned through constraints.txt: an unpinned resolution can swap in another build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

LINT_STAMP := $(VENV)/.installed-lint

setup-lint: $(LINT_STAMP)

$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,lint]'
	touch $(LINT_STAMP)

# ruff (lint + format check) and mypy, configured in pyproject.toml; CI runs this before the tests.
lint: setup-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Apply ruff's formatting and safe fixes.
format: setup-lint
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: setup
	$(BIN)/adamae-pretrain +experiment=demo

# The real-video path: encode a few H.264 videos, shard them with adamae-shards, pre-train from the shards.
demo-video: setup
	rm -rf runs/demo-video
	$(BIN)/python tools/demo_videos.py runs/demo-video/videos
	$(BIN)/adamae-shards runs/demo-video/videos runs/demo-video/shards --short-side 80 --samples-per-shard 4 --workers 2
	# One compute thread for training: the 2 data workers need the other cores (oversubscribed, a step is 10x slower).
	OMP_NUM_THREADS=1 $(BIN)/adamae-pretrain +experiment=demo_video

# Hypothesis 4 at small scale: AdaMAE vs random masking, pre-trained alike, linear-probed on a motion task.
demo-probe: setup
	$(BIN)/python -m adamae_scale.finetune.probe_demo

# Two pytest workers, each taking whole files (module fixtures are built once): most tests wait on one
# single-threaded subprocess, so a second worker uses the second core (13.5 -> 9 minutes on 2 cores).
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# On a machine with a CUDA device: bf16 autocast, flash attention and NCCL pre-training checks.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf runs outputs .pytest_cache

# On a CUDA machine: the CUDA tests, AdaMAE's option costs at micro-batch 32 (bf16, with and without compile) and the
# demo parity of each option, as JSON lines in runs/gpu_check/ (tools/gpu_check.sh; about 8 minutes on one H200).
gpu-check: setup
	tools/gpu_check.sh
