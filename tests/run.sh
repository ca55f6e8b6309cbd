#!/usr/bin/env bash
# The test suite, on CPU ranks. Sets up .venv on first use.
#   bash tests/run.sh          everything (what CI runs): ruff, the format check, tests/unit and tests/integration
#   bash tests/run.sh --fast   tests/unit alone (in-process, no rank started), about a minute: for your own loop
# Further arguments go to pytest (e.g. -k families). The last line gives the wall time and the rank launches.
# Two pytest-xdist workers (PIPEGPT_TEST_WORKERS; 0: one process): a launch keeps 2 cores busy only ~65% of its
# time (imports, a one-rank run, the launcher's polling), so two workers finish sooner. tests/conftest.py keeps each
# file, and the files sharing a launched run, on one worker; each torch uses one thread, as each rank does.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
source ./setup_env.sh
export DS_ACCELERATOR=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ruff check .
ruff format --check .
folders=(tests/unit tests/integration)
if [ "${1:-}" = "--fast" ]; then
  shift
  folders=(tests/unit)
  export PIPEGPT_FAST_TIER=1  # a unit test that starts ranks fails instead of slowing the tier
fi
PIPEGPT_LAUNCH_LOG="$(mktemp)"
export PIPEGPT_LAUNCH_LOG  # tests/helpers.py writes a line per launch.sh or deepspeed start
status=0
workers=${PIPEGPT_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers") && export OMP_NUM_THREADS=1; fi
python -m pytest -q "${parallel[@]}" "${folders[@]}" "$@" || status=$?
echo "suite: $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s wall, $(wc -l <"$PIPEGPT_LAUNCH_LOG") rank launches"
rm -f "$PIPEGPT_LAUNCH_LOG"
exit $status
