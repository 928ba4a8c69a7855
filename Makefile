# pykubeproxy: every entry point installs what it needs first (apt + a local venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit kernel bench clean image

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps
	scripts/install-system-deps
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# The sandbox demo: a one-node cluster in network namespaces, the API double, the agent.
demo: setup
	$(PY) -m pykubeproxy.sandbox.demo

# Lint, types, then every test (unit, kernel with real packets in netns, end to end).
test: lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check pykubeproxy tests bench
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest tests/unit

# iptables (in netns on this kernel), the agent process end to end in iptables mode (~10 min),
# then IPVS (in one VM on Debian's kernel, ~3 min under TCG).
bench: setup
	$(PY) bench/bench_iptables.py
	$(PY) bench/bench_agent.py
	$(PY) bench/bench_ipvs.py

# The agent's container image. It needs Docker and Python 3 (with venv) only: none of the
# test prerequisites `setup` installs. Python packages come only from a wheelhouse built here
# at the versions in requirements.lock; the wheelhouse is the build context, so the build
# itself uses no package index. Without Docker Hub: scripts/make-base-image, then
# `make image BASE_IMAGE=pykubeproxy-base:bookworm`. DOCKER_HOST picks the daemon.
IMAGE ?= pykubeproxy:dev
BASE_IMAGE ?= debian:bookworm-slim
DOCKER ?= docker
WHEELHOUSE := build/wheelhouse
BUILD_VENV := build/venv

# Any Python with pip builds the wheelhouse (the image test passes its own as IMAGE_PY=...);
# by default a venv of its own that holds pip and nothing else.
IMAGE_PY ?= $(BUILD_VENV)/bin/python

image: $(IMAGE_PY)
	rm -rf $(WHEELHOUSE)
	$(IMAGE_PY) -m pip wheel -q . pip --constraint requirements.lock --wheel-dir $(WHEELHOUSE)
	cp requirements.lock $(WHEELHOUSE)/
	$(DOCKER) build --network host --build-arg BASE_IMAGE=$(BASE_IMAGE) --tag $(IMAGE) \
		--file Dockerfile $(WHEELHOUSE)

$(BUILD_VENV)/bin/python:
	python3 -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/pip install -q --upgrade pip

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
