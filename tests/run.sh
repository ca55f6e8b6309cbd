#!/usr/bin/env bash
# The test suite, on CPU ranks. Sets up .venv on first use.
#   bash tests/run.sh          everything (what CI runs): ruff, the format check, all tests with real ranks
#   bash tests/run.sh --fast   the in-process tier (no rank started), about a minute: for your own loop
# Further arguments go to pytest (e.g. -k families).
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup_env.sh
export DS_ACCELERATOR=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ruff check .
ruff format --check .
if [ "${1:-}" = "--fast" ]; then
  shift
  export PIPEGPT_FAST_TIER=1  # a test that starts ranks without the `ranks` mark fails instead of slowing the tier
  exec python -m pytest -q -m "not ranks and not transformers4" tests "$@"
fi
exec python -m pytest -q tests "$@"
