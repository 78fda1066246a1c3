#!/bin/sh
# Interrupts a `nestcache` run (bench, stress, selftest, run) whose output
# goes to a file and prints that file and the exit status, for
# run_and_check.cmake to judge.
#
#   interrupt_run.sh NESTCACHE SIGNAL WAIT_FOR ARGS...
#
# WAIT_FOR: a fixed string; the signal is sent once the output file holds it
# (bench's first table, stress's header line), or, when it is "-", once the
# run blocks SIGINT and SIGTERM (the command's signal watch is up: a signal
# sent before that would end it the default way). The run is stopped (SIGSTOP) while the signal is sent and
# continued after, so that a run with little left to do cannot finish between
# the check of its output and the signal.
exe=$1 sig=$2 wait_for=$3
shift 3
out=$(mktemp)
"$exe" "$@" >"$out" 2>&1 &
pid=$!
# True once the run is ready for the signal.
ready() {
  if [ "$wait_for" != "-" ]; then
    grep -qF -- "$wait_for" "$out"
  else
    # SigBlk of the main thread, in hex: bits 1 (SIGINT) and 14 (SIGTERM).
    blocked=$(sed -n 's/^SigBlk:[[:space:]]*//p' /proc/$pid/status 2>/dev/null)
    [ -n "$blocked" ] && [ $((0x$blocked & 0x4002)) -eq $((0x4002)) ]
  fi
}
i=0
until ready; do
  i=$((i + 1))
  if [ $i -gt 600 ] || ! kill -0 $pid 2>/dev/null; then
    echo "interrupt_run: the run was never ready for the signal (waiting for '$wait_for')"
    break
  fi
  sleep 0.1
done
kill -s STOP $pid
kill -s "$sig" $pid
kill -s CONT $pid
wait $pid
status=$?
cat "$out"
rm -f "$out"
echo "exit status $status"
exit $status
