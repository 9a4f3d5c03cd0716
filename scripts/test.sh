#!/usr/bin/env bash
# Install what the tests need, check style and types, run the test suite.
# This is the README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[test]'
python -m ruff check .
python -m ruff format --check .
python -m mypy
# pytest exits 5 when it selects no test: that fails CI too (set -e).
python -m pytest "$@"
