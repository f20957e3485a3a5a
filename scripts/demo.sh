#!/usr/bin/env bash
# Set up (Debian packages + a virtualenv in .venv) and run the demo against a local Pebble CA.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py
