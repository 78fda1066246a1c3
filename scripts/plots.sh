#!/usr/bin/env bash
# Runs the sweeps behind docs/workloads.md and draws them with gnuplot
# (Debian: gnuplot-nox) into docs/plots/: one SVG per sweep, one line per
# page strategy, beside the CSV it was drawn from. About two minutes on two
# cores.
# Usage: scripts/plots.sh [path/to/nestcache]
# (default: build/release/nestcache; build it first with the release preset).
set -euo pipefail
cd "$(dirname "$0")/.."
exe=${1:-build/release/nestcache}
out=docs/plots
command -v gnuplot >/dev/null || { echo "plots.sh: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -x "$exe" ] || { echo "plots.sh: $exe not found; build the release preset first" >&2; exit 1; }
mkdir -p "$out"

sweep() {  # name, then the bench arguments
  local name=$1
  shift
  echo "plots.sh: $name" >&2
  "$exe" bench "$@" --csv "$out/$name.csv" >"$out/$name.txt"
}

# nested-io: L2 vCPUs per L1 vCPU, past the 8 nested contexts of one L1 vCPU.
sweep nested-io-l2-per-l1 --tests nested-io --sweep l2-per-l1=1,2,4,8,12,16,24,32 --iterations 100 --runs 3
# nested-io: the hardware exit + entry cost (612 ns is the model's default).
sweep nested-io-exit-cost --tests nested-io --sweep exit-cost-ns=0,150,300,612,1200,2500,5000 --iterations 300 --runs 3
# memslot_perf's map test: L2 memslots, 8 to KVM's limit (a quarter of upstream's area, best of 3 runs
# of 4 iterations: the L0 part is measured CPU time, which other load on the machine disturbs a little).
sweep map-slots --tests map --sweep slots=8,64,512,2048,8192,32764 --scale 0.25 --iterations 4 --runs 3
# memslot_perf's map test: idle pfn caches registered beside the strategy's own, which every one of the
# host's discards (an MMU-notifier invalidation) must not find.
sweep map-caches --tests map --sweep caches=0,64,512,2048,8192 --scale 0.25 --iterations 4 --runs 3

# plot NAME TITLE XLABEL COLUMN YLABEL LOGX LOGY: one line per strategy of COLUMN (seconds, drawn in µs).
plot() {
  local name=$1 title=$2 xlabel=$3 column=$4 ylabel=$5 logx=$6 logy=$7 svg=$8
  gnuplot <<GP
set terminal svg size 640,400 font "sans,11" background "white" noenhanced
set output "$out/$svg.svg"
set datafile separator ","
set title "$title"
set xlabel "$xlabel"
set ylabel "$ylabel"
set key top left
set grid
$( [ "$logx" = 1 ] && echo "set logscale x 2" )
$( [ "$logy" = 1 ] && echo "set logscale y" )
plot for [s in "map cache oracle"] "< awk -F, -v s=".s." 'NR > 1 && \$2 == s' $out/$name.csv" \
     using 1:(\$$column * 1e6) with linespoints title s
GP
}

plot nested-io-l2-per-l1 "nested-io: cost per nested round trip" "L2 vCPUs per L1 vCPU" 4 \
  "modelled µs per round trip" 1 0 nested-io-l2-per-l1-round-trip
plot nested-io-l2-per-l1 "nested-io: cost per request" "L2 vCPUs per L1 vCPU" 3 \
  "modelled µs per request (busy)" 1 0 nested-io-l2-per-l1-request
plot nested-io-exit-cost "nested-io: cost per request against the exit cost" "exit + entry cost (ns)" 3 \
  "modelled µs per request (busy)" 0 0 nested-io-exit-cost-request
plot map-slots "memslot_perf map: cost per nested round trip" "L2 memslots" 4 \
  "modelled µs per round trip" 1 1 map-slots-round-trip
plot map-caches "memslot_perf map: cost per nested round trip against registered caches" \
  "idle pfn caches registered (--extra-caches)" 4 "modelled µs per round trip" 0 1 map-caches-round-trip
echo "plots.sh: wrote $(ls "$out"/*.svg | wc -l) plots to $out" >&2
