# Fresh-machine entry points: `make demo` (the archive job on its embedded default) and
# `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch is enough for the demo and the tests; on a GPU box install the CUDA
# build you want first (the project itself only needs torch>=2.3).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python jobs/segment_archive.py

test: setup
	$(BIN)/python -m pytest
