# Every target sets itself up: a fresh clone needs nothing but python3 (>= 3.10).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch and torchvision must come as a matching pair; override on other machines, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast lint policy clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q $(TORCH_SPEC) 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e '.[dev,vision]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import metacompress.cli.main, torch, torchvision, torch_pruning, onnxruntime"
	touch $(STAMP)

setup: $(STAMP)

# half the measured latency of vgg-small on 16x16 digits, on this machine's runtime
demo: setup
	$(VENV)/bin/metacompress compress vgg-small --data digits@16 --target-latency 0.5 --out out/demo

# tests run in parallel worker processes, one per core (each test model uses one thread)
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --maxprocesses=4

test: setup
	$(PY) -m pytest -q $(XDIST)

# the unit tests only: no subprocess, benchmark-smoke or whole-model runs (marked integration)
test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not integration"

lint: setup
	$(VENV)/bin/ruff check metacompress cli tests benchmarks

# re-train the shipped default policy (two stages, about 15 min on 2 cores) and install it
policy: setup
	$(VENV)/bin/metacompress policy train --config recipes/policy-default.yaml
	$(VENV)/bin/metacompress policy train --config recipes/policy-default-stage2.yaml
	cp out/policy-default-stage2/policy.json out/policy-default-stage2/policy.safetensors metacompress/policy/default/

clean:
	rm -rf $(VENV) out .pytest_cache
