#!/usr/bin/env bash
# Creates .venv with Python 3.12 (JAX >= 0.11 needs it) and installs dsv2-jax with its test extras.
# Idempotent: re-running only installs what is missing. Usage: bash tools/setup_venv.sh [extra ...]
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then echo "$c"; return 0; fi
  done
  echo "setup_venv: python3.12 not found (install it, e.g. 'pyenv install 3.12' or apt's python3.12)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras="test${1:+,$1}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
