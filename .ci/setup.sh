#!/usr/bin/env bash
# Installs what gflows needs on a fresh Debian machine: gfortran (escnn -> py3nj builds Fortran),
# a virtual environment in .venv and the package with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v gfortran >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing gfortran (needed to build escnn's dependency py3nj)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gfortran >/dev/null
  else
    echo "setup: gfortran is missing; escnn's dependency py3nj needs a Fortran compiler to build." >&2
    echo "       install it first, e.g. 'sudo apt-get install gfortran', then run this again." >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and on its own, so the pinned local wheels are used where the machine has them.
.venv/bin/python -m pip install -q "torch>=2.2,<2.15" "torchvision>=0.17,<0.30"
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -c "import gflows, escnn, nflows, zuko; print('setup: gflows', gflows.__version__, 'ready')"
