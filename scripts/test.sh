#!/usr/bin/env bash
# Install (if needed), lint (ruff check + format check) and run the whole test suite, real-data tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# lint and formatting first: a style slip fails in seconds, before the suite's minutes
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export MPQ_REQUIRE_REALDATA=1
# one worker per core (pytest-xdist), each test file on one worker (its module fixtures are built once);
# --durations shows where the time goes
.venv/bin/python -m pytest -q -n auto --dist loadfile --durations=15 "$@"
