# Two commands for a new user: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build first: any other torch requirement would pull GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# constraints.txt pins the versions this repo is tested with, so pip resolves in seconds, not minutes.
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint typecheck docs bench data paper paper-quick clean

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

# ruff check and the format check over the code, the docs' hook and the Python blocks of the Markdown pages.
LINT_PATHS := flwr_serverless tests benchmarks examples docs README.md CONTRIBUTING.md
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# The docs site (mkdocs.yml, docs/): strict, so a broken link, a page missing from the nav or a benchmark
# table that no longer renders from benchmarks/results/*.json fails the build.
# mypy on the public API ([tool.mypy] in pyproject.toml: flwr_serverless/__init__.py and what it imports).
typecheck: install
	$(VENV)/bin/mypy

docs: install
	$(VENV)/bin/mkdocs build --strict -d site

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
	rm -rf $(VENV) demo-store site .pytest_cache
