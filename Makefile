# pykubeproxy: every entry point installs what it needs first (apt + a local venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit kernel bench clean

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

bench: setup
	$(PY) bench/bench_iptables.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
