# `make simulate` runs the main job, `make test` the tests; both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export FEDRNN_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: simulate test pretrain lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: an open range would pull a multi-GB CUDA build
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

simulate: $(VENV)/.installed
	$(PY) -m fedrnn.simulate --clients 100

test: $(VENV)/.installed
	$(PY) -m pytest

pretrain: $(VENV)/.installed
	$(PY) -m fedrnn.model.pretrain --out cache/teacher

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
