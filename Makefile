# Fresh-machine entry points: `make demo` (the archive job on its embedded default) and
# `make test`. Both create .venv on first use through infra/install.sh (the install CI and the
# image run too): requirements.lock through uv, torch through pip, the project editable.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0, the tested version. On PyPI it is the CUDA 13.0 build; a machine with a CPU wheel
# in pip's find-links (CI) gets that one. For a CPU build elsewhere:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin

.PHONY: demo test setup lock
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock infra/install.sh
	TORCH='$(TORCH)' TORCH_INDEX_URL='$(TORCH_INDEX_URL)' PYTHON='$(PYTHON)' infra/install.sh $(VENV)
	touch $@

# Regenerate requirements.lock after changing pyproject.toml's dependencies: one universal
# resolution (Python >= 3.10, any OS) with hashes; torch and its CUDA runtime stay out (see
# infra/lock-excludes.txt), the pip step of infra/install.sh brings them.
lock:  # with the uv that `make setup` put in $(VENV)
	$(BIN)/uv pip compile pyproject.toml --extra test --universal --python-version 3.10 \
	  --no-python-downloads --generate-hashes --no-emit-package torch \
	  --excludes infra/lock-excludes.txt -o requirements.lock

demo: setup
	$(BIN)/python jobs/segment_archive.py

test: setup
	$(BIN)/python -m pytest
