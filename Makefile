# Two entry points on a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch from this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,face]'
	# insightface (the face extra) pulls opencv-python over opencv-python-headless: put the headless cv2 back
	$(PY) -m pip install -q --force-reinstall --no-deps opencv-python-headless==5.1.0.95
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffbase demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports  # layers point down, no import cycles (.importlinter)
	$(PY) -m pytest -q -n 2 --dist loadfile

check: $(STAMP)  # the inner loop: lint and the unit tier (about 2 minutes on 2 cores)
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile -m unit

bench: $(STAMP)
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/vton.py
	$(PY) benchmarks/dreamfit.py
	$(PY) benchmarks/dreamo.py
	$(PY) benchmarks/upscale.py
	$(PY) benchmarks/gpu.py --tiny  # on a GPU machine: python benchmarks/gpu.py --out benchmarks/gpu.md

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
