#!/usr/bin/env bash
# Builds and runs every test: the clang -Wthread-safety compile check, then
# release, ThreadSanitizer and AddressSanitizer+UBSan builds with all of
# CTest, then a short libFuzzer run of each fuzz target (clang, ASan+UBSan).
# Usage: scripts/test.sh [step...]   (steps: thread-safety release tsan asan fuzz;
#                                     default: all of them, in that order)
# The builds keep line tables only (-g1: release, tsan, asan, fuzz) and the
# thread-safety check no debug information, which cuts their compile time
# and keeps every report's file:line; CI runs all of this in 25 to 27 of its
# 30 minutes on 2 cores (the builds about 22, the tests about 4.5).
# Environment: FUZZ_SECONDS (default 20), how long each fuzz target runs.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
((${#steps[@]})) || steps=(thread-safety release tsan asan fuzz)
jobs=$(nproc)
for p in "${steps[@]}"; do
  echo "=== ${p} ===" >&2
  if [ "$p" = fuzz ]; then
    scripts/fuzz.sh --seconds "${FUZZ_SECONDS:-20}"
    continue
  fi
  cmake --preset "$p" >/dev/null
  cmake --build --preset "$p" -j "$jobs"
  if [ "$p" != thread-safety ]; then
    ctest --preset "$p" -j "$jobs"
  fi
done
echo "all tests passed (${steps[*]})" >&2
