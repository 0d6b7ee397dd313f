# make demo: the embedded default job.  make test: lint + the test suite.
# Both create .venv and install what they need on a fresh machine, from pyproject.toml (the one list of
# dependencies): the project itself in editable mode, so the checkout's code is what runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The torch pin of pyproject's `eval` extra, installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH := $(shell grep -o '"torch==[^"]*"' pyproject.toml | head -n1 | tr -d '"')

.PHONY: demo test lint format clean requirements

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime pyproject.toml
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m dpq_jax.main

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# -n auto: one pytest worker per core (at most 4); most tests wait on single-threaded XLA compiles.
test: lint
	$(PY) -m pytest -q -n auto --maxprocesses=4

format: $(VENV)/.dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# requirements.txt: pyproject's runtime dependencies for tools that read only that file (tests check they agree).
requirements:
	$(PYTHON) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
	  open('requirements.txt', 'w').write('# Generated from pyproject.toml by make requirements; edit pyproject.toml.\n' + '\n'.join(d) + '\n')"

clean:
	rm -rf $(VENV) runs build *.egg-info
