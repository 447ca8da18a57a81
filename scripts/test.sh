#!/usr/bin/env bash
# The test command: unit tests, real llama-server tests, then end-to-end tests on a real
# local control plane (started and stopped by e2e/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export MODELFIT_CACHE="${MODELFIT_CACHE:-$HOME/.cache/modelfit}"
[ -f e2e/env.sh ] && source e2e/env.sh
export PYTHONPATH="$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sources, whatever the venv points at
python -m pytest tests e2e -q "$@"
