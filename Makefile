# kubetrain: every entry point a user or CI needs. `make help` lists them.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt $(PIP_EXTRA)
ARGS   ?=
TARGET ?= local
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`; a test module stays on one worker (its fixtures are
# module-scoped pipeline runs and servers)
TEST_WORKERS ?= auto

IMAGE_REGISTRY ?= ghcr.io/kubetrain
IMAGE_TAG      ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE          := $(IMAGE_REGISTRY)/kubetrain
DOCKER         ?= docker
REVISION       := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_ARGS     := --build-arg VERSION=$(IMAGE_TAG) --build-arg REVISION=$(REVISION)

OVERLAY ?= gpu-cluster
KUBECTL ?= $(VENV)/bin/kubectl
S3_ENV  := manifests/base/s3-credentials.env

LINT_PATHS := kubetrain components pipelines tests
RUFF       := $(VENV)/bin/ruff

.PHONY: help install install-serve install-test run serve compile render lint format test test-fast bench bench-scale bench-images bench-gpu deploy submit images push clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.run: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "kubetrain | installing into $(VENV) (first time: about 2 minutes)"
	$(PIP) -e .
	@touch $@

$(VENV)/.serve: $(VENV)/.run
	$(PIP) -e ".[serve]"
	@touch $@

$(VENV)/.test: $(VENV)/.run
	$(PIP) -e ".[test]"
	@touch $@

install: $(VENV)/.run ## create .venv and install kubetrain

install-serve: $(VENV)/.serve ## install kubetrain with the serving extra (FastAPI, uvicorn)

install-test: $(VENV)/.test ## install kubetrain with the test tools

run: install ## run the whole pipeline locally (kfp.local); ARGS="--dataset breast_cancer --epochs 5"
	$(VENV)/bin/kubetrain run $(ARGS)

serve: $(VENV)/.serve ## serve a published bundle over KServe's v2 protocol; ARGS="--bundle runs/models/digits/<version> --port 8080"
	$(VENV)/bin/kubetrain serve $(ARGS)

compile: install ## write the pipeline YAML to pipelines/compiled/ (TARGET=local|cluster)
	$(VENV)/bin/kubetrain compile --target $(TARGET) --image-registry $(IMAGE_REGISTRY) --image-tag $(IMAGE_TAG) $(ARGS)

render: install ## write the SparkApplication, Katib Experiment, TrainJob and InferenceService a cluster run creates; ARGS="--engine spark"
	$(VENV)/bin/kubetrain render --image-registry $(IMAGE_REGISTRY) --image-tag $(IMAGE_TAG) $(ARGS)

submit: install ## compile for the cluster, upload and run on Kubeflow; ARGS="--host http://localhost:8080 --param epochs=50 --wait"
	$(VENV)/bin/kubetrain submit $(ARGS)

lint: install-test ## ruff: lint rules and formatting, checked only (CI runs this)
	@rc=0; \
	$(RUFF) check $(LINT_PATHS) || rc=1; \
	$(RUFF) format --check $(LINT_PATHS) || rc=1; \
	exit $$rc

format: install-test ## ruff: apply the safe lint fixes and reformat
	$(RUFF) check --fix $(LINT_PATHS)
	$(RUFF) format $(LINT_PATHS)

test: install-test ## run every tier: unit, integration, e2e (CI runs this; about 10 minutes on 2 cores)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: install-test ## run the unit tier only (about 3 minutes; no servers or subprocesses)
	$(PY) -m pytest -m unit -q $(PYTEST_ARGS)

bench: install ## measure pipeline and stage speed
	$(PY) -m kubetrain.local.bench $(ARGS)

bench-scale: install ## peak RSS per stage at 1M vs 10M rows, clean vs pandas+sklearn; ARGS="--skip-big"
	$(PY) -m kubetrain.local.bench_scale $(ARGS)

bench-images: install ## image path on CPU: generate, decode, augment, ResNet train img/s; ARGS="--images 2000"
	$(PY) -m kubetrain.local.bench_images $(ARGS)

bench-gpu: install ## train stage's loop vs a tuned raw loop, img/s on the GPU (CPU: ARGS="--quick")
	$(PY) -m kubetrain.local.bench_gpu $(ARGS)

images: ## build the CPU (with Java and pyspark for --engine spark) and CUDA images (IMAGE_REGISTRY, IMAGE_TAG)
	$(DOCKER) build -f docker/Dockerfile.cpu  $(BUILD_ARGS) -t $(IMAGE):$(IMAGE_TAG)-cpu .
	$(DOCKER) build -f docker/Dockerfile.cuda $(BUILD_ARGS) -t $(IMAGE):$(IMAGE_TAG)-cuda .

push: images ## push both images to IMAGE_REGISTRY
	$(DOCKER) push $(IMAGE):$(IMAGE_TAG)-cpu
	$(DOCKER) push $(IMAGE):$(IMAGE_TAG)-cuda

deploy: install-test ## apply the platform manifests to the current kube context (OVERLAY=gpu-cluster|single-node)
	@test -f manifests/overlays/$(OVERLAY)/kustomization.yaml || { \
	  echo "error: no overlay '$(OVERLAY)'; use OVERLAY=$$(ls manifests/overlays | paste -sd'|' -)"; exit 2; }
	@test -f $(S3_ENV) || { \
	  echo "error: $(S3_ENV) is missing; create it from the example and fill in the keys (it is git-ignored):"; \
	  echo "  cp $(S3_ENV).example $(S3_ENV) && \$${EDITOR:-vi} $(S3_ENV)"; exit 2; }
	@grep -Eq '^AWS_ACCESS_KEY_ID=.+' $(S3_ENV) && grep -Eq '^AWS_SECRET_ACCESS_KEY=.+' $(S3_ENV) || { \
	  echo "error: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in $(S3_ENV)"; exit 2; }
	$(KUBECTL) apply -k manifests/overlays/$(OVERLAY)

clean: ## remove runs, compiled YAML and caches (keeps .venv)
	rm -rf runs pipelines/compiled .pytest_cache
