#!/usr/bin/env bash
# Set up .venv and run the offline demo: cache SmolLM2-135M-Instruct activations over
# CPython's own prose (persisted shuffle on), then train an SAE from the cache.
# Extra arguments go to `sae-cache-ext demo` (for example `--tokens 20000`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 sae-cache-ext demo "$@"
