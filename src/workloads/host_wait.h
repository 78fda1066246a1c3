// How a scenario's host thread (the VMM's, or the test's) waits for state
// another thread changes — a flag in guest memory, an atomic a guest sets:
// it polls, sleeping between polls. Every such wait goes through here, so a
// change of how host threads wait is made in one place.
#pragma once

#include <chrono>
#include <thread>

namespace nestcache::workloads {

// Returns once `done()` holds, calling it first at once and then every
// `interval`.
template <class Done>
void host_wait_until(Done done, std::chrono::microseconds interval) {
  while (!done()) std::this_thread::sleep_for(interval);
}

}  // namespace nestcache::workloads
