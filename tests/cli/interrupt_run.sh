#!/bin/sh
# Interrupts a `nestcache bench` run whose output goes to a file and prints
# that file and the exit status, for run_and_check.cmake to judge.
#
#   interrupt_bench.sh NESTCACHE SIGNAL WAIT_FOR BENCH_ARGS...
#
# WAIT_FOR: a fixed string; the signal is sent once the output file holds it
# (the first test's table), or at once when it is "-".
exe=$1 sig=$2 wait_for=$3
shift 3
out=$(mktemp)
"$exe" bench "$@" >"$out" 2>&1 &
pid=$!
if [ "$wait_for" != "-" ]; then
  i=0
  until grep -qF -- "$wait_for" "$out"; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $pid 2>/dev/null; then
      echo "interrupt_bench: '$wait_for' never appeared"
      break
    fi
    sleep 0.1
  done
else
  sleep 0.5
fi
kill -s "$sig" $pid
wait $pid
status=$?
cat "$out"
rm -f "$out"
echo "exit status $status"
exit $status
