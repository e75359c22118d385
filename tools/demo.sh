#!/usr/bin/env bash
# Newcomer command 1: set up, then run the demo on the embedded SmolLM2-135M model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/qroar-gguf demo "$@"
