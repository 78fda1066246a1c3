#!/usr/bin/env bash
# Does a benchmark result depend on the machine's load? Runs the default job's
# tests (map, unmap, unmap-chunked; map, cache and oracle side by side) twice:
# on a quiet machine, then beside busy processes; and compares, per test, the
# modelled time per nested round trip of each strategy and the map/cache ratio.
#
# Modelled time (DESIGN.md §5) should make the two runs agree: waiting costs
# nothing by itself, remap windows cost a figure calibrated once per process,
# and L0's other work is timed in thread CPU time. What load can still move:
# that CPU time, where it really gets slower on a loaded machine (a busy
# hyperthread sibling, colder caches), and the calibration itself.
#
# Usage: scripts/bench-load-check.sh [--hogs N] [--tolerance PCT] [--build DIR] [bench options...]
#   --hogs N        busy processes beside the second run (default: 2, one per core here)
#   --tolerance P   the largest difference accepted, in percent (default: 15)
#   --build DIR     where the nestcache binary is (default: build/release)
# Other options go to `nestcache bench` (default: the default job's --scale 0.25 --seconds 0.5).
# Exit status: 0 when every figure agrees within the tolerance, 1 otherwise.
# It is a measurement, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."

hogs=2
tolerance=15
build=build/release
bench_args=()
while (($#)); do
  case "$1" in
    --hogs) hogs="$2"; shift 2 ;;
    --tolerance) tolerance="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) bench_args+=("$1"); shift ;;
  esac
done
((${#bench_args[@]})) || bench_args=(--scale 0.25 --seconds 0.5)
bin="$build/nestcache"
[ -x "$bin" ] || { echo "bench-load-check: $bin not found; build first (cmake --build --preset release)" >&2; exit 2; }
[[ "$hogs" =~ ^[0-9]+$ ]] || { echo "bench-load-check: --hogs takes a count, not '$hogs'" >&2; exit 2; }

out=$(mktemp -d)
pids=()
cleanup() { ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null; rm -rf "$out"; }
trap cleanup EXIT

run() {
  "$bin" bench --tests map,unmap,unmap-chunked --strategy map,cache,oracle "${bench_args[@]}" --json >"$1"
}

echo "bench-load-check: quiet run" >&2
run "$out/quiet.json"
echo "bench-load-check: run beside $hogs busy process(es)" >&2
for ((i = 0; i < hogs; i++)); do
  (while :; do :; done) &
  pids+=($!)
done
run "$out/loaded.json"
kill "${pids[@]}" 2>/dev/null || true
pids=()

python3 - "$out/quiet.json" "$out/loaded.json" "$tolerance" "$hogs" <<'EOF'
import json, sys
quiet, loaded = (json.load(open(p)) for p in sys.argv[1:3])
tol, hogs = float(sys.argv[3]), sys.argv[4]

def figures(report):
    rows = {}
    for r in report["results"]:
        for view in ("per_round_trip", "per_iteration"):
            rows[(r["test"], r["strategy"], view)] = r["breakdown"][view]["total_ns"]
    out = {}
    for (test, strategy, view), ns in rows.items():
        name = view.replace("_", " ")
        out[f"{test} {strategy} {name} (ns)"] = ns
        if strategy == "map" and (test, "cache", view) in rows:
            out[f"{test} map/cache {name}"] = ns / rows[(test, "cache", view)]
    return out

q, l = figures(quiet), figures(loaded)
wq, wl = quiet.get("window_cost") or {}, loaded.get("window_cost") or {}
if wq and wl:
    cost = lambda w: w["open_ns"] + w["close_ns"]
    print(f"remap window ({wq.get('source')}): quiet {cost(wq)} ns, beside {hogs} hogs {cost(wl)} ns "
          f"({(cost(wl) - cost(wq)) / cost(wq) * 100:+.1f}%)")
bad = 0
print(f"{'figure':48} {'quiet':>10} {'+' + hogs + ' hogs':>10} {'diff':>8}")
for name in q:
    if name not in l:
        continue
    diff = (l[name] - q[name]) / q[name] * 100 if q[name] else 0.0
    flag = "" if abs(diff) <= tol else "  <-- beyond ±%g%%" % tol
    bad += bool(flag)
    print(f"{name:48} {q[name]:10.1f} {l[name]:10.1f} {diff:+7.1f}%{flag}")
print(f"{'agree' if not bad else str(bad) + ' figure(s) differ'} within ±{tol:g}%")
sys.exit(1 if bad else 0)
EOF
