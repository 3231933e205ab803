#!/usr/bin/env bash
# The one install of the project, run by `make setup` (and so by .ci/run) and by infra/Dockerfile:
# every package but torch from requirements.lock (exact versions and hashes, through uv), then
# torch with pip, then the project itself (editable, no dependency resolution).
#
#   TORCH='torch==2.13.0' infra/install.sh PREFIX
#
# PREFIX: a virtual environment (created with $PYTHON, default python3, when it has no
# bin/python) or an existing Python prefix such as the Ray image's /home/ray/anaconda3.
# TORCH: the torch requirement pip installs unless PREFIX already imports torch. On PyPI,
# torch==2.13.0 is the CUDA 13.0 build; where a CPU wheel lies in pip's find-links (CI machines)
# pip takes that one. TORCH_INDEX_URL (optional): pip's index for it, e.g. the PyTorch CPU index
# https://download.pytorch.org/whl/cpu. torch stays with pip because uv reads neither pip's
# find-links nor its config, and would fetch the CUDA build instead of the local CPU wheel.
set -euo pipefail

prefix=${1:?usage: TORCH=REQUIREMENT [TORCH_INDEX_URL=URL] $0 PREFIX}
: "${TORCH:?set TORCH to the torch requirement to install, e.g. torch==2.13.0}"
repo=$(cd "$(dirname "$0")/.." && pwd)
uv_version=0.13.9  # the uv that wrote requirements.lock

[[ -x $prefix/bin/python ]] || "${PYTHON:-python3}" -m venv "$prefix"
py=$prefix/bin/python
"$py" -m pip install -q "uv==$uv_version"
uv=$prefix/bin/uv
# The lock first: torch's own pure-Python dependencies (sympy, networkx, ...) are in it, so pip
# below finds them installed at the locked versions and adds only torch (and a CUDA build's runtime).
"$uv" pip install -q --python "$py" --compile-bytecode --require-hashes -r "$repo/requirements.lock"
if ! "$py" -c 'import torch' 2>/dev/null; then
  "$py" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH"
fi
"$uv" pip install -q --python "$py" --no-deps -e "$repo"
# Bytecode now, not at each import (uv's --compile-bytecode above, pip's by default, compileall for
# the project's source): uv writes none by default, and where PYTHONDONTWRITEBYTECODE is set (CI's
# machine, many images) every process, each Ray worker included, compiled its imports from source
# at every start (`import ray.data` 3.8 -> 1.3 s CPU in a fresh venv, the CPU tasks' module 2.1 -> 0.7 s).
"$py" -m compileall -q "$repo/resdsn_ray" >/dev/null
# Every requirement met (a lock that lags pyproject.toml fails here). In an existing prefix that is
# not a venv (the Ray image's conda) packages outside the lock, conda's own, may miss theirs: said, not fatal.
if [[ -f $prefix/pyvenv.cfg ]]; then
  "$uv" pip check --python "$py"
else
  "$uv" pip check --python "$py" || echo "install.sh: the unmet requirements above are outside requirements.lock" >&2
fi
"$py" -c 'import ray, torch, resdsn_ray.cli; print(f"installed: ray {ray.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")'
