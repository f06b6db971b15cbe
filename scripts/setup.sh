#!/usr/bin/env bash
# Create .venv (Python 3.11) and install kdray with its test extras from requirements.lock. Safe to re-run
# (about 10 s when everything is installed).
# --require-hashes: every package is the lock's version and one of the files the lock names by sha256, whatever
# index or mirror pip is configured with. kdray itself goes in with --no-deps (the lock holds its dependencies)
# and --no-build-isolation (built by the lock's setuptools, not by one fetched unpinned). To change a
# dependency: edit pyproject.toml, then bash scripts/lock.sh (docs/deployment.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
