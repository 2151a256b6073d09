# Two commands for a new user: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build first: any other torch requirement would pull GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# constraints.txt pins the versions this repo is tested with, so pip resolves in seconds, not minutes.
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint bench data paper paper-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/flwr-serverless simulate --nodes 3 --mode async --strategy fedavg \
		--dataset digits --skew 0.9 --epochs 20 --store ./demo-store

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check flwr_serverless tests benchmarks examples

bench: install
	$(PY) benchmarks/store_overhead.py

# Fashion-MNIST for the paper tables: Debian's package puts the IDX files in /usr/share/datasets/fashion-mnist.
# Without it the experiment falls back to scikit-learn's digits (no download).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: present"; \
	else $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y dataset-fashion-mnist; fi

# The paper tables and plots (benchmarks/results/paper_default.*): ~40 min on 2 idle cores; runs are cached.
paper: install
	$(PY) benchmarks/paper/run.py

paper-quick: install
	$(PY) benchmarks/paper/run.py --quick

clean:
	rm -rf $(VENV) demo-store .pytest_cache
