#!/usr/bin/env bash
# Builds and runs every test: release and ThreadSanitizer (the issue's two),
# AddressSanitizer+UBSan, and the clang -Wthread-safety compile check.
# Usage: scripts/test.sh [preset...]   (default: all of them)
set -euo pipefail
cd "$(dirname "$0")/.."
presets=("$@")
((${#presets[@]})) || presets=(thread-safety release tsan asan)
jobs=$(nproc)
for p in "${presets[@]}"; do
  echo "=== ${p} ===" >&2
  cmake --preset "$p" >/dev/null
  cmake --build --preset "$p" -j "$jobs"
  if [ "$p" != thread-safety ]; then
    ctest --preset "$p" -j "$jobs"
  fi
done
echo "all tests passed (${presets[*]})" >&2
