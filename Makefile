# The two commands of the README: `make run` and `make test`. Both create the virtualenv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test migrate bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sma run

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

migrate: $(STAMP)
	$(VENV)/bin/sma migrate

clean:
	rm -rf $(VENV) .sma-data .pytest_cache .hypothesis
