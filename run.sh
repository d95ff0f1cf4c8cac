#!/usr/bin/env bash
# Set up (first time) and run the main job: prune the bundled SmolLM2-135M with ALPS, evaluate
# dense and pruned perplexity on held-out Wikipedia articles, write model + reports under ./runs/.
# Extra arguments go to `alpsprune prune` (e.g. ./run.sh --method sparsegpt --mask-structure 2:4).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
exec .venv/bin/alpsprune prune "$@"
