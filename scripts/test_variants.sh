#!/usr/bin/env bash
# Run the test suite under several BLAS code paths and thread counts (issue 14, item 3): results must not
# depend on the CPU's MKL kernel choice. Bitwise assertions in the suite compare two runs of the same code
# path only; everything else carries a tolerance. Usage: scripts/test_variants.sh [pytest args...]
# Prints one line per variant (exit status, pass/fail counts, seconds) and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
variants=(
  "default, 1 thread|ALPSPRUNE_TEST_THREADS=1"
  "default, 2 threads|ALPSPRUNE_TEST_THREADS=2"
  "MKL_ENABLE_INSTRUCTIONS=AVX2|ALPSPRUNE_TEST_THREADS=1 MKL_ENABLE_INSTRUCTIONS=AVX2"
  "MKL_CBWR=COMPATIBLE|ALPSPRUNE_TEST_THREADS=1 MKL_CBWR=COMPATIBLE"
)
status=0
summary=()
for v in "${variants[@]}"; do
  name=${v%%|*}
  envs=${v#*|}
  start=$(date +%s)
  log=$(mktemp)
  env $envs .venv/bin/python -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
  rc=$?
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -1 | sed 's/=//g')
  summary+=("$(printf '%-32s rc=%d  %s  (%ss)' "$name" "$rc" "$line" "$(( $(date +%s) - start ))")")
  if [ "$rc" -ne 0 ]; then
    status=1
    grep -E '^FAILED|^ERROR' "$log" | sed 's/^/    /'
  fi
  rm -f "$log"
done
printf '%s\n' "${summary[@]}"
exit $status
