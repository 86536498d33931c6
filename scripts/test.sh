#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, real-data tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPQ_REQUIRE_REALDATA=1
.venv/bin/python -m pytest -q "$@"
