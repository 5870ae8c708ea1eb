# `make help` lists the targets. `make run` and `make test` create .venv first when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
DEMO_DIR ?= outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help setup run test test-full clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

setup: $(READY) ## create .venv with the pinned dependencies

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

run: $(READY) ## main job: MNIST-5k, two narrow ResNet18s, 9 layers × 5 objectives → table + stitching plot
	$(PY) -m stitching.train -m experiment=demo objective=dm,hint,fula,slm,tlm hydra.sweep.dir=$(DEMO_DIR)
	$(PY) -m stitching.report $(DEMO_DIR)

test: $(READY) ## fast tests (what CI runs)
	$(PY) -m pytest -m "not slow"

test-full: $(READY) ## every test, slow ones included
	$(PY) -m pytest

clean: ## remove run outputs (keeps .venv, the zoo and downloaded data)
	rm -rf outputs multirun lightning_logs
