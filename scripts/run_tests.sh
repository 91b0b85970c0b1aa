#!/usr/bin/env bash
# The default test run: Python unit + integration tests, then the brownie contract suite.
# Heavy cases are marked `heavy` and run with `make test-heavy`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PWD/.venv/bin:$PATH"
status=0
# --durations: the slowest cases print at the end, to keep the run inside its budget.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=40 || status=$?
# brownie's runner needs its own plugin, which pyproject's addopts disables for the Python suite.
.venv/bin/brownie test tests/contracts -o addopts="" || status=$?
exit $status
