#!/usr/bin/env bash
# Set up .venv and run lint, type checks and the test suite.
# Extra arguments go to pytest (for example `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check sae_cache_ext tests
ruff format --check sae_cache_ext tests
pyright sae_cache_ext
python -m pytest "$@"
