#!/usr/bin/env bash
# Set up (see setup.sh) and run the linters and the whole test suite against real Pebble and nginx.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export CERTBATCH_REQUIRE_PEBBLE="${CERTBATCH_REQUIRE_PEBBLE:-1}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
