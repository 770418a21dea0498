#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the whole test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The tests run the real nnInteractive server on CPU: torch's CPU build first, then everything pinned to it.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c scripts/constraints.txt -e ".[test]"
exec .venv/bin/python -m pytest "$@"
