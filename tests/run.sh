#!/usr/bin/env bash
# The whole test suite, on CPU ranks. Sets up .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup_env.sh
export DS_ACCELERATOR=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ruff check .
exec python -m pytest -q tests "$@"
