#!/bin/sh
# Interrupts a `nestcache` run (bench, stress) whose output goes to a file
# and prints that file and the exit status, for run_and_check.cmake to judge.
#
#   interrupt_run.sh NESTCACHE SIGNAL WAIT_FOR ARGS...
#
# WAIT_FOR: a fixed string; the signal is sent once the output file holds it
# (bench's first table, stress's header line), or after half a second when
# it is "-".
exe=$1 sig=$2 wait_for=$3
shift 3
out=$(mktemp)
"$exe" "$@" >"$out" 2>&1 &
pid=$!
if [ "$wait_for" != "-" ]; then
  i=0
  until grep -qF -- "$wait_for" "$out"; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $pid 2>/dev/null; then
      echo "interrupt_run: '$wait_for' never appeared"
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
