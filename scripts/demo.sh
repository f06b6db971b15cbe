#!/usr/bin/env bash
# The README's main command: set up (if needed) and run the whole pipeline on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m jobs.pipeline "$@"
