#!/usr/bin/env bash
# Set up (see setup.sh) and run the linters and the whole test suite against real Pebble and nginx.
# Usage: scripts/test.sh [--fast] [PYTEST ARGS...]
#   The tests run in parallel (pytest-xdist, one worker per CPU: -n auto; pass -n 0 for one
#   process, or -n N). --fast: only the quick unit tests (-m "not slow": no Pebble, no servers,
#   no run of the real command), without the setup and mypy; see docs/development.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
    shift
    if ! .venv/bin/python -c 'import xdist, certbatch' 2>/dev/null; then
        scripts/setup.sh --test
    fi
    .venv/bin/ruff check src tests benchmarks
    exec .venv/bin/python -m pytest -n auto --dist loadfile -m "not slow" -q "$@"
fi
scripts/setup.sh --test
export CERTBATCH_REQUIRE_PEBBLE="${CERTBATCH_REQUIRE_PEBBLE:-1}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
# loadfile: all the tests of a module on one worker, which sets its module fixtures up once.
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
