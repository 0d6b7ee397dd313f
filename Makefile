# make demo: the embedded default job.  make test: lint + the test suite.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint format clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) torch==2.13.0
	$(PIP) -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m dpq_jax.main

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

format: $(VENV)/.dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs
