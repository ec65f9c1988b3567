# Every target creates .venv on first use and installs the project (with the dev extra) into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo ui bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# The inner loop: everything that starts no Ray, MLflow or S3 server (those tests are marked slow).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) pipelines/train.py --config configs/demo.yaml

# The MLflow UI over the demo's embedded store, on loopback only.
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# The CUDA path in one run (docs/gpu-check.md): exits 0 with one line where there is no GPU.
GPU_CHECK_OUT ?= runs/gpu-check

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
