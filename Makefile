# finetune-operator developer entry points. Two commands matter on a fresh machine:
#   make demo   the whole flow on a local control plane (no cluster or GPU needed)
#   make test   every test, against a real local control plane
# Both install what they need (virtual environment, pip packages, control-plane
# binaries built from Go modules) and are safe to run again.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: all venv binaries test demo demo-down crds chart-crds lint clean help

help:
	@echo "make demo    run a real fine-tune through the operator on a local control plane"
	@echo "make test    run every test (builds the control plane from Go modules on first use)"
	@echo "make crds    regenerate crds/ and the chart's copies from the API models"
	@echo "make lint    ruff"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> [1/3] Python environment in $(VENV) (first time: ~4 min, ~6 GB: torch, transformers, kopf, ...)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --progress-bar off --upgrade pip >/dev/null
	$(PY) -m pip install --progress-bar off -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

binaries: venv
	@echo "==> [2/3] control-plane binaries (built from Go modules once, then cached in ~/.cache/finetune-operator)"
	@$(VENV)/bin/finetune-operator dev build >/dev/null

test: binaries
	@echo "==> [3/3] tests"
	$(PY) -m pytest $(PYTEST_ARGS)

demo: binaries
	@echo "==> [3/3] demo"
	$(VENV)/bin/finetune-operator demo

demo-down: venv
	$(VENV)/bin/finetune-operator demo down

crds: venv
	$(VENV)/bin/finetune-operator crds
	$(PY) charts/finetune-operator/hack/sync_crds.py

# The chart's CRD templates are crds/ wrapped for Helm (tests/test_chart.py checks drift).
chart-crds: venv
	$(PY) charts/finetune-operator/hack/sync_crds.py

lint: venv
	$(VENV)/bin/ruff check operator worker tests

clean:
	rm -rf $(VENV) .pytest_cache .demo
