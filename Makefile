# Every target creates the virtual environment first when it is missing (or older than
# pyproject.toml), so `make run` and `make test` are the whole set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# The torch build to install; pinned to the release the project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: run test lint bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) train.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/qat_overhead.py
	$(PY) bench/int8_inference.py
