#!/usr/bin/env bash
# Newcomer command 2 (and CI): set up with test dependencies, fetch the default model and text, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh test
.venv/bin/python tools/fetch_default_model.py
.venv/bin/python tools/fetch_texts.py
.venv/bin/python -m pytest -q -ra --durations=30 "$@"
