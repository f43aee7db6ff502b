# Two commands do everything on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Each creates the virtual environment first when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The offline CIFAR-10 copy when it sits beside the repository; override with BCM_DATA=/path.
BCM_DATA ?= $(if $(wildcard ../shared/data/cifar10),$(abspath ../shared/data/cifar10),)
export BCM_DATA

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

# The demo runs a seeded 2,000-image subset of the test set: within 12 minutes on a 2-core CPU without native bf16
# (float32); all 10,000 images take about 5x as long there (drop --n for the full table).
demo: setup
	$(PY) -m bench.transfer --source wrn --eps 8 --n 2000 --out runs/demo/transfer-wrn-eps8.csv

test: setup
	$(PY) -m pytest -q
