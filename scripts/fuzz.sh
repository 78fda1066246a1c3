#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan+UBSan, in build/fuzz) and fuzzes
# each on a temporary copy of its seed corpus, so the checked-in corpus never
# grows. Prints inputs run, inputs/s and coverage per target; exits 1 on any
# crash, leak, timeout or out-of-memory, naming the input that caused it.
#
# Usage: scripts/fuzz.sh [--seconds S | --runs N] [target...]
#   --seconds S  fuzz each target for S seconds (default 30)
#   --runs N     fuzz each target for N inputs instead
#   target       nested_state, scenario_parser (default: both, one after the other)
# Environment: FUZZ_BUILD_DIR (default build/fuzz), FUZZ_LOG_DIR (default
# $FUZZ_BUILD_DIR/logs; each run's full libFuzzer log is kept there),
# FUZZ_ARGS (more libFuzzer flags). See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# usage [STATUS]: the Usage lines above; to stdout with status 0 for --help,
# to stderr with status 2 (a usage error) otherwise.
usage() {
  if [[ ${1:-2} == 0 ]]; then
    sed -n 's/^# \{0,1\}//; 7,10p' "$0"
    exit 0
  fi
  sed -n 's/^# \{0,1\}//; 7,10p' "$0" >&2
  exit 2
}

limit=(-max_total_time=30)
targets=()
while (($#)); do
  case "$1" in
    --seconds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage; limit=(-max_total_time="$2"); shift 2 ;;
    --runs) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage; limit=(-runs="$2"); shift 2 ;;
    nested_state | scenario_parser) targets+=("$1"); shift ;;
    fuzz_nested_state | fuzz_scenario_parser) targets+=("${1#fuzz_}"); shift ;;
    -h | --help) usage 0 ;;
    *) echo "fuzz.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
((${#targets[@]})) || targets=(nested_state scenario_parser)

if ! command -v clang++ >/dev/null; then
  echo "fuzz.sh: clang++ not found: the fuzz targets need clang's libFuzzer (apt-get install clang)" >&2
  exit 1
fi

build=${FUZZ_BUILD_DIR:-build/fuzz}
logs=${FUZZ_LOG_DIR:-$build/logs}
start=$SECONDS
cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
  -DNESTCACHE_FUZZ=ON -DNESTCACHE_SANITIZE=address,undefined -DNESTCACHE_BENCH=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target "${targets[@]/#/fuzz_}"
echo "fuzz.sh: built in $((SECONDS - start)) s" >&2
mkdir -p "$logs"

# The longest input each target is given: a nested-state blob is at most
# 4,160 bytes, the largest scenario seed about 5 KB; twice that still holds
# every oversized form, and the time per input grows with its length.
declare -A max_len=([nested_state]=8192 [scenario_parser]=8192)

work=$(mktemp -d "${TMPDIR:-/tmp}/nestcache-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=0
for t in "${targets[@]}"; do
  corpus=$work/$t
  artifacts=$logs/$t-artifacts/
  log=$logs/$t-$(date -u +%Y%m%dT%H%M%SZ).log
  mkdir -p "$corpus" "$artifacts"
  cp fuzz/corpus/"$t"/* "$corpus"/
  echo "=== fuzz_$t ${limit[*]} (log: $log)" >&2
  t0=$EPOCHREALTIME
  rc=0
  # -timeout: an input that takes 10 s is a hang (the slowest seen take
  # milliseconds). Leak checking is libFuzzer's default under ASan.
  UBSAN_OPTIONS=print_stacktrace=1:${UBSAN_OPTIONS:-} \
    "$build"/fuzz/fuzz_"$t" "${limit[@]}" -max_len="${max_len[$t]}" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts" ${FUZZ_ARGS:-} "$corpus" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  read -r wall rate < <(awk -v a="$t0" -v b="$EPOCHREALTIME" -v n="${runs:-0}" \
    'BEGIN { w = b - a; printf "%.1f %.0f\n", w, (w > 0 ? n / w : 0) }')
  last=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([^ ]*\).*/\1 edges, \2 features, corpus \3/p' <<<"$last")
  if ((rc == 0)); then
    echo "fuzz_$t: ${runs:-?} inputs in ${wall} s (${rate:-?}/s), coverage ${cov:-?}; no finding" >&2
  else
    failed=1
    what=$(grep -m1 -oE 'ERROR: (libFuzzer: [a-z -]+|AddressSanitizer: [a-zA-Z-]+|LeakSanitizer: [a-z ]+)|runtime error: .*|nested-state fuzz finding: .*' "$log" || true)
    input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "fuzz_$t: FAILED (exit $rc) after ${runs:-?} inputs in ${wall} s: ${what:-see the log}" >&2
    echo "fuzz_$t: input: ${input:-(none written)}; log: $log" >&2
    echo "fuzz_$t: reproduce: $build/fuzz/fuzz_$t ${input:-INPUT}" >&2
  fi
done
exit "$failed"
