#!/usr/bin/env bash
# Model-checks the pfn-cache / invalidation / nested-entry protocol
# (model/protocol.pml) with SPIN.
#
#   nestcache's protocol: every property must hold in every configuration
#     (exhaustive search); prints the properties, states and times.
#   each variant that drops one step: must break a property in one of those
#     configurations; prints its counterexample as numbered steps.
#
# Usage: model/check.sh [--full] [--only VARIANT] [-j N]
#   --full          also three larger configurations (about 100 million
#                   states, half an hour on two busy cores, 3 GB of memory)
#   --only VARIANT  just that variant's counterexample (SEED, NO_WAIT, ...)
#   -j N            searches run in parallel (default: the number of CPUs)
# Exit status: 0 as expected; 1 if a property of ours fails, a search is
# incomplete, or a variant stops failing; 77 if spin is not installed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
full=0
only=""
jobs=$(nproc 2>/dev/null || echo 2)
while (($#)); do
  case "$1" in
    --full) full=1 ;;
    --only) only="$2"; shift ;;
    -j) jobs="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v spin >/dev/null 2>&1; then
  echo "model check skipped: spin is not installed (Debian package: spin)"
  exit 77
fi
cc=${CC:-cc}
command -v "$cc" >/dev/null 2>&1 || { echo "check.sh: no C compiler ($cc) for SPIN's verifier" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s.%N)

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
defs_of() { local d=""; for x in $1; do d+=" -D$x"; done; echo "$d"; }

# verify <dir> <macros> <cc flags> <pan flags>: generates, compiles and runs
# SPIN's verifier in <dir>; its report is <dir>/pan.out.
verify() {
  local dir=$1
  mkdir -p "$dir" && cp "$here/protocol.pml" "$dir/" && cd "$dir"
  # shellcheck disable=SC2046
  spin -a $(defs_of "$2") protocol.pml >spin.out 2>&1 || { cat spin.out >pan.out; return 0; }
  # shellcheck disable=SC2086
  "$cc" -w $3 -o pan pan.c 2>cc.out || { cat cc.out >pan.out; return 0; }
  # shellcheck disable=SC2086
  ./pan $4 >pan.out 2>&1 || true
}
field() { awk -v k="$1" '$0 ~ k { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.e+]+$/) { print $i; exit } }' pan.out; }
errors() { awk '/errors:/ { for (i = 1; i <= NF; i++) if ($i == "errors:") print $(i + 1) }' pan.out; }
complete() { grep -q "errors:" pan.out && ! grep -qE "max search depth too small|out of memory|aborted|error:" pan.out; }
trail() { spin -T -t $(defs_of "$1") protocol.pml 2>/dev/null || true; }

# Each job writes its report to $work/<n>.out and "ok" or "fail" to $work/<n>.st.
ours_job() {  # <n> <config> <safety|progress> [cc flags]
  local n=$1 cfg=$2 prop=$3 t0 t1
  t0=$(now)
  if [ "$prop" = safety ]; then
    verify "$work/$n" "$cfg ENTRY_INVARIANT" "-O0 -DSAFETY -DNOCLAIM" "-m100000"
  else  # the larger configurations store states compressed (several GB otherwise)
    verify "$work/$n" "$cfg" "-O1 ${4:-}" "-m100000 -a -f -N progress"
  fi
  t1=$(now)
  if [ "$(errors)" = 0 ] && complete; then
    printf "  %-30s %-8s verified: %9s states, %10s transitions, %6ss search, %5ss with compilation\n" \
      "$cfg" "$prop" "$(field 'states, stored')" "$(field 'transitions')" "$(field 'elapsed time')" "$(secs "$t0" "$t1")" \
      >"$work/$n.out"
    echo ok >"$work/$n.st"
  else
    { echo "FAILED: ours, $cfg, $prop"; sed -n '1,25p' pan.out
      [ -f protocol.pml.trail ] && trail "$cfg" | awk -f "$here/trail_steps.awk"; } >"$work/$n.out"
    echo fail >"$work/$n.st"
  fi
}

variant_job() {  # <n> <name> <property> <config> <what>
  local n=$1 name=$2 prop=$3 cfg=$4 what=$5 t0 t1
  t0=$(now)
  if [ "$prop" = safety ]; then  # -i: the shortest counterexample
    verify "$work/$n" "$name $cfg" "-O0 -DSAFETY -DNOCLAIM -DREACH" "-m100000 -i"
  else
    verify "$work/$n" "$name $cfg" "-O0" "-m100000 -a -f -N progress"
  fi
  t1=$(now)
  {
    echo
    echo "== $name: $what"
    if [ "$(errors)" = 0 ] || [ ! -f protocol.pml.trail ]; then
      echo "FAILED: $name no longer breaks $prop ($cfg)"; sed -n '1,25p' pan.out
      echo fail >"$work/$n.st"
    else
      trail "$name $cfg" >trail.txt
      if [ "$prop" = safety ] && ! grep -q "^@@ VIOLATION" trail.txt; then
        echo "FAILED: $name: the trail shows no access violation"; echo fail >"$work/$n.st"
      elif [ "$prop" = progress ] && ! grep -q "START OF CYCLE" trail.txt; then
        echo "FAILED: $name: the trail shows no cycle"; echo fail >"$work/$n.st"
      else
        echo ok >"$work/$n.st"
      fi
      echo "counterexample ($prop, $cfg; $(secs "$t0" "$t1")s):"
      awk -f "$here/trail_steps.awk" trail.txt
    fi
  } >"$work/$n.out"
}

# Configurations: vCPUs, host changes (migrate or discard of hva A, or of B
# once memslot changes exist; each in its own thread), memslot changes
# (move, delete, re-create); REBIND: vCPU 0 may give its L2 up and vCPU 1 then
# take its cache over.
configs=("NVCPU=1 NINV=1 NSLOT=2" "NVCPU=1 NINV=2 NSLOT=0" "NVCPU=2 NINV=1 NSLOT=0" "NVCPU=2 NINV=1 NSLOT=1 REBIND")
full_configs=("NVCPU=1 NINV=1 NSLOT=3" "NVCPU=1 NINV=2 NSLOT=1" "NVCPU=2 NINV=1 NSLOT=1")

# Variants: name | property it must break | configuration | what it drops.
variants=(
  "SEED|safety|NVCPU=1 NINV=1 NSLOT=2|the seed (v4): a software refresh of a vCPU-bound cache does not request a vmcs02 rewrite"
  "SEED|safety|NVCPU=1 NINV=1 NSLOT=2 HOST_AFTER_SLOT_CHANGE|the seed again, host changes only after a memslot change: the refresh follows the page to its new hva"
  "NO_WAIT|safety|NVCPU=1 NINV=1 NSLOT=2|the notifier kicks the bound vCPUs but does not wait for them to leave guest mode"
  "NO_RETRY|safety|NVCPU=1 NINV=1 NSLOT=2|refresh installs the frame it mapped without the mmu_invalidate_seq retry"
  "NO_LAST_CHECK|safety|NVCPU=1 NINV=1 NSLOT=2|no last check for invalid caches after IN_GUEST_MODE is published"
  "FLIPPED_ONLY|safety|NVCPU=1 NINV=2 NSLOT=0|the notifier waits only for vCPUs of caches it flips from valid (the seed's patch 2)"
  "SW_DEACTIVATE|safety|NVCPU=1 NINV=1 NSLOT=2|a failed software refresh deactivates the cache"
  "NO_DEACTIVATE|progress|NVCPU=1 NINV=1 NSLOT=2|a vCPU-bound cache whose activation fails stays active (no patch-4 deactivation)"
  "STALE_SNAPSHOT|progress|NVCPU=1 NINV=1 NSLOT=2|refresh snapshots mmu_invalidate_seq once instead of on every try"
  "NAME_FIRST|safety|NVCPU=2 NINV=1 NSLOT=0 REBIND|the notifier names a cache's bound vCPU before marking the cache invalid (nestcache before 3bddd42)"
)

n=0
running=0
launch() {
  "$@" &
  running=$((running + 1))
  if ((running >= jobs)); then wait -n || true; running=$((running - 1)); fi
}
if [ -z "$only" ]; then
  for cfg in "${configs[@]}"; do
    n=$((n + 1)); launch ours_job "$n" "$cfg" safety
    n=$((n + 1)); launch ours_job "$n" "$cfg" progress
  done
  if ((full)); then
    for cfg in "${full_configs[@]}"; do
      n=$((n + 1)); launch ours_job "$n" "$cfg" safety
      n=$((n + 1)); launch ours_job "$n" "$cfg" progress -DCOLLAPSE
    done
  fi
fi
first_variant=$((n + 1))
found=0
for v in "${variants[@]}"; do
  IFS='|' read -r name prop cfg what <<<"$v"
  [ -n "$only" ] && [ "$only" != "$name" ] && continue
  found=1
  n=$((n + 1)); launch variant_job "$n" "$name" "$prop" "$cfg" "$what"
done
wait
if [ -n "$only" ] && ((!found)); then echo "check.sh: no variant $only" >&2; exit 2; fi

if [ -z "$only" ]; then
  echo "== nestcache's protocol"
  echo "safety: every access L2 makes through vmcs02's pfn, and every access L0 software makes"
  echo "  through the cache, hits a frame that is not free and still backs its hva; at every entry"
  echo "  into L2, vmcs02's frame is the one its valid cache holds, filed at that frame's hva"
  echo "progress (weak fairness): vCPU 0 (with REBIND: vCPU 0 or 1) runs L2 again and again (no entry is cancelled forever,"
  echo "  every refresh ends once invalidations stop) and every host change returns"
fi
status=0
for ((i = 1; i <= n; i++)); do
  ((i == first_variant)) && [ -z "$only" ] && echo && echo "== variants: each must break a property of ours"
  cat "$work/$i.out" 2>/dev/null || echo "FAILED: search $i left no report"
  [ "$(cat "$work/$i.st" 2>/dev/null)" = ok ] || status=1
done
echo
if ((status)); then
  echo "model check: FAILED ($(secs "$start" "$(now)")s)"
else
  echo "model check: as expected: ours verified, every variant fails ($(secs "$start" "$(now)")s)"
fi
exit $status
