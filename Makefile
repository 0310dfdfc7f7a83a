# finetune-operator developer entry points. Two commands matter on a fresh machine:
#   make demo   the whole flow on a local control plane (no cluster or GPU needed)
#   make test   every test, against a real local control plane
# Both install what they need (virtual environment, pip packages, control-plane
# binaries built from Go modules) and are safe to run again.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The four distributions of this repository (see pyproject.toml): a change to any of
# them reinstalls.
PYPROJECTS := pyproject.toml api/pyproject.toml operator/pyproject.toml worker/pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(PYPROJECTS) | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
# What `make lint` (and so `make test`) checks with ruff; settings in pyproject.toml.
LINT_PATHS := api operator worker dev bench tests charts

# The images the chart runs by default: values.yaml's image.repository (tag: the chart's
# appVersion) and worker.image.repository:worker.image.tag. REGISTRY=... builds them under
# your own registry; point the chart there with the --set values `make images` prints.
REGISTRY ?= ghcr.io/finetune-dev
VERSION ?= $(shell sed -n 's/^appVersion: *"*\([^"]*\)"*$$/\1/p' charts/finetune-operator/Chart.yaml)
OPERATOR_IMAGE ?= $(REGISTRY)/finetune-operator:$(VERSION)
WORKER_IMAGE ?= $(REGISTRY)/finetune-worker:$(VERSION)
CONTAINER_ENGINE ?= $(shell command -v docker || command -v podman)

.PHONY: all venv binaries test demo demo-down crds chart-crds lint format clean help images \
	push-images container-engine bench-scale

help:
	@echo "make demo    run a real fine-tune through the operator on a local control plane"
	@echo "make test    lint, then run every test (builds the control plane from Go modules on first use)"
	@echo "make crds    regenerate crds/ and the chart's copies from the API models"
	@echo "make lint    ruff check and ruff format --check (the first step of make test)"
	@echo "make format  ruff format and ruff check --fix: repairs most of what make lint reports"
	@echo "make images  build the operator and worker images with docker or podman (REGISTRY=...)"
	@echo "make push-images  build them, then push them to REGISTRY"
	@echo "make bench-scale  the operator under 1,000 FineTuneJobs on 100 kwok GPU nodes, kill -9s included (SCALE_ARGS=...)"

venv: $(STAMP)

$(STAMP): $(PYPROJECTS)
	@echo "==> [1/3] Python environment in $(VENV) (first time: ~4 min, ~6 GB: torch, transformers, kopf, ...)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --progress-bar off --upgrade pip >/dev/null
	$(PY) -m pip install --progress-bar off -e ./api -e ./operator -e ./worker -e .
	@rm -f $(VENV)/.installed-* && touch $@

binaries: venv
	@echo "==> [2/3] control-plane binaries (built from Go modules once, then cached in ~/.cache/finetune-operator)"
	@$(VENV)/bin/finetune-dev cluster build >/dev/null

# Lint first: a style error fails in seconds, before the control plane is built.
test: lint binaries
	@echo "==> [3/3] tests"
	$(PY) -m pytest $(PYTEST_ARGS)

demo: binaries
	@echo "==> [3/3] demo"
	$(VENV)/bin/finetune-dev demo

demo-down: venv
	$(VENV)/bin/finetune-dev demo down

crds: venv
	$(VENV)/bin/finetune-operator crds
	$(PY) charts/finetune-operator/hack/sync_crds.py

# The chart's CRD templates are crds/ wrapped for Helm (tests/delivery/test_chart.py checks drift).
chart-crds: venv
	$(PY) charts/finetune-operator/hack/sync_crds.py

lint: venv
	@echo "==> lint (ruff check, ruff format --check)"
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: venv
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

# Development only, not part of `make test` (its small version is
# tests/controller/test_operator_scale.py): many FineTuneJobs at once on kwok GPU nodes, the
# operator killed during the burst; prints latency percentiles, RSS, API requests per job,
# duplicates and orphans (bench/finetune_bench/scale.py; results in docs/operations.md).
SCALE_ARGS ?= --jobs 1000 --nodes 100 --kills 3
# The operator's own environment as its image has it (Dockerfile.operator: api + operator and
# their dependencies, nothing of the worker's), so that bench-scale's resident size is the pod's.
OPERATOR_VENV := .venv-operator
OPERATOR_STAMP := $(OPERATOR_VENV)/.installed-$(shell cat api/pyproject.toml operator/pyproject.toml | sha256sum | cut -c1-12)

# The packages are installed as the image installs them (not editable): rebuilt when any of
# their sources changes, or the scale benchmark would measure an older operator.
$(OPERATOR_STAMP): api/pyproject.toml operator/pyproject.toml \
		$(shell find api/finetune_api operator/finetune_operator -name '*.py' -o -name '*.yaml')
	@echo "==> the operator image's Python packages in $(OPERATOR_VENV)"
	@test -x $(OPERATOR_VENV)/bin/python || $(PYTHON) -m venv $(OPERATOR_VENV)
	$(OPERATOR_VENV)/bin/pip install --progress-bar off --force-reinstall --no-deps ./api ./operator
	$(OPERATOR_VENV)/bin/pip install --progress-bar off ./api ./operator
	@rm -rf api/build operator/build  # setuptools' in-tree leftovers
	@rm -f $(OPERATOR_VENV)/.installed-* && touch $@

bench-scale: binaries $(OPERATOR_STAMP)
	$(PY) bench/scale.py --operator-python $(OPERATOR_VENV)/bin/python $(SCALE_ARGS)

# Not part of `make test`: building the worker image downloads several GB (PyTorch, CUDA).
container-engine:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
	  echo "make images: neither docker nor podman is on PATH; install one of them (or set" \
	       "CONTAINER_ENGINE to a docker-compatible CLI) and run it again." >&2; exit 1; fi
	@if ! $(CONTAINER_ENGINE) info >/dev/null 2>&1; then \
	  echo "make images: $(CONTAINER_ENGINE) is installed but '$(CONTAINER_ENGINE) info' fails:" \
	       "its engine is not running or not reachable (start the Docker daemon, or podman's" \
	       "machine/service) and run it again." >&2; exit 1; fi

images: container-engine
	$(CONTAINER_ENGINE) build -f Dockerfile.operator -t $(OPERATOR_IMAGE) .
	$(CONTAINER_ENGINE) build -f Dockerfile.worker -t $(WORKER_IMAGE) .
	@echo "built $(OPERATOR_IMAGE) and $(WORKER_IMAGE); install the chart with" \
	      "--set image.repository=$(REGISTRY)/finetune-operator --set image.tag=$(VERSION)" \
	      "--set worker.image.repository=$(REGISTRY)/finetune-worker" \
	      "--set worker.image.tag=$(VERSION)"

push-images: images
	$(CONTAINER_ENGINE) push $(OPERATOR_IMAGE)
	$(CONTAINER_ENGINE) push $(WORKER_IMAGE)

clean:
	rm -rf $(VENV) $(OPERATOR_VENV) .pytest_cache .demo
