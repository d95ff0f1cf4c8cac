#!/usr/bin/env bash
# GPU check (issue 15): prune a 7B-shaped random model (real widths, 2 blocks, 128×2048, bf16) with ALPS and
# SparseGPT, faithful and default recipes, and record time and peak device memory per phase against the
# memory plan. Writes bench/results/gpu_check.json.
#
#   bench/gpu_check.sh                 # on a CUDA machine
#   bench/gpu_check.sh --device cpu    # small CPU smoke run (hidden 256, 4×128 tokens; tests/test_memory.py runs it)
#
# Extra arguments go to bench/gpu_check.py (e.g. --blocks 4, --max-iter 30, --output PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if [[ " $* " == *" --device cpu "* ]]; then
  exec "$PY" bench/gpu_check.py --hidden 256 --intermediate 688 --vocab 1000 --nsamples 4 --seqlen 128 \
    --dtype float32 --max-iter 6 --output bench/results/gpu_check_cpu.json "$@"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" bench/gpu_check.py --device cuda "$@"
