#!/usr/bin/env bash
# Does a benchmark result depend on the machine's load? Runs the default job's
# tests (map, unmap, unmap-chunked; map, cache and oracle side by side) on a
# quiet machine and beside busy processes, alternately, and compares, per
# test, the modelled time per nested round trip and per iteration of each
# strategy and the map/cache ratios: the median of the quiet runs against the
# median of the loaded ones.
#
# Modelled time (DESIGN.md §5) should make the two agree: waiting costs
# nothing by itself, remap windows cost a figure calibrated once per process,
# and L0's other work is timed in thread CPU time. What load can still move:
# that CPU time, where it really gets slower on a loaded machine (a busy
# hyperthread sibling, colder caches), and the calibration itself. What
# moves without load: a virtual machine's interrupts (the window's TLB
# shootdown) cost more or less from one second to the next as its host is
# busier, so single runs differ by several percent; hence alternating pairs
# and medians, and the quiet runs' own spread printed beside.
#
# Usage: scripts/bench-load-check.sh [--pairs N] [--hogs N] [--tolerance PCT] [--build DIR] [bench options...]
#   --pairs N       quiet/loaded pairs, run alternately (default: 3)
#   --hogs N        busy processes beside the loaded runs (default: 2, one per core here)
#   --tolerance P   the largest difference accepted, in percent (default: 15)
#   --build DIR     where the nestcache binary is (default: build/release)
# Other options go to `nestcache bench` (default: the default job's --scale 0.25 --seconds 0.5).
# Exit status: 0 when every figure agrees within the tolerance, 1 otherwise.
# It is a measurement, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."

pairs=3
hogs=2
tolerance=15
build=build/release
bench_args=()
while (($#)); do
  case "$1" in
    --pairs) pairs="$2"; shift 2 ;;
    --hogs) hogs="$2"; shift 2 ;;
    --tolerance) tolerance="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) bench_args+=("$1"); shift ;;
  esac
done
((${#bench_args[@]})) || bench_args=(--scale 0.25 --seconds 0.5)
bin="$build/nestcache"
[ -x "$bin" ] || { echo "bench-load-check: $bin not found; build first (cmake --build --preset release)" >&2; exit 2; }
[[ "$hogs" =~ ^[0-9]+$ ]] || { echo "bench-load-check: --hogs takes a count, not '$hogs'" >&2; exit 2; }
[[ "$pairs" =~ ^[1-9][0-9]*$ ]] || { echo "bench-load-check: --pairs takes a count of 1 or more, not '$pairs'" >&2; exit 2; }
[[ "$tolerance" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "bench-load-check: --tolerance takes a percentage, not '$tolerance'" >&2; exit 2; }

out=$(mktemp -d)
pids=()
cleanup() { ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null; rm -rf "$out"; }
trap cleanup EXIT

run() {
  "$bin" bench --tests map,unmap,unmap-chunked --strategy map,cache,oracle "${bench_args[@]}" --json >"$1"
}

start_hogs() {
  for ((i = 0; i < hogs; i++)); do
    (while :; do :; done) &
    pids+=($!)
  done
}
stop_hogs() {
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null || true
  pids=()
}

for ((p = 1; p <= pairs; p++)); do
  echo "bench-load-check: pair $p of $pairs: quiet run" >&2
  run "$out/quiet.$p.json"
  echo "bench-load-check: pair $p of $pairs: run beside $hogs busy process(es)" >&2
  start_hogs
  run "$out/loaded.$p.json"
  stop_hogs
done

python3 - "$out" "$pairs" "$tolerance" "$hogs" <<'EOF'
import json, statistics, sys
out, pairs, tol, hogs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
quiet = [json.load(open(f"{out}/quiet.{p}.json")) for p in range(1, pairs + 1)]
loaded = [json.load(open(f"{out}/loaded.{p}.json")) for p in range(1, pairs + 1)]

def figures(report):
    rows = {}
    for r in report["results"]:
        for view in ("per_round_trip", "per_iteration"):
            rows[(r["test"], r["strategy"], view)] = r["breakdown"][view]["total_ns"]
    out = {}
    w = report.get("window_cost") or {}
    if w:
        out["remap window (ns)"] = w["open_ns"] + w["close_ns"]
    for (test, strategy, view), ns in rows.items():
        name = view.replace("_", " ")
        out[f"{test} {strategy} {name} (ns)"] = ns
        if strategy == "map" and (test, "cache", view) in rows:
            out[f"{test} map/cache {name}"] = ns / rows[(test, "cache", view)]
    return out

q, l = [figures(r) for r in quiet], [figures(r) for r in loaded]
bad = 0
print(f"medians of {pairs} quiet and {pairs} loaded run(s), taken alternately; "
      "'spread' is the quiet runs' (max - min) / median")
print(f"{'figure':48} {'quiet':>12} {'+' + hogs + ' hogs':>12} {'diff':>8} {'spread':>7}")
for name in q[0]:
    qs = [f[name] for f in q if name in f]
    ls = [f[name] for f in l if name in f]
    if len(qs) != pairs or len(ls) != pairs:
        continue
    qm, lm = statistics.median(qs), statistics.median(ls)
    diff = (lm - qm) / qm * 100 if qm else 0.0
    spread = (max(qs) - min(qs)) / qm * 100 if qm else 0.0
    flag = "" if abs(diff) <= tol else "  <-- beyond ±%g%%" % tol
    bad += bool(flag)
    print(f"{name:48} {qm:12.1f} {lm:12.1f} {diff:+7.1f}% {spread:6.1f}%{flag}")
print(f"{'agree' if not bad else str(bad) + ' figure(s) differ'} within ±{tol:g}%")
sys.exit(1 if bad else 0)
EOF
