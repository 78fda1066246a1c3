// What a run left behind once it was torn down: the figures a run reports
// under "teardown" to prove that nothing leaked.
//
// VM resources (remap windows, pins, active pfn caches) are read from a VM
// after its machine is destroyed (NestedEnv::tear_down). Nested contexts
// (counted process-wide, vmx::VmxNestedContext::live_count), threads (the
// project's own, host::running_threads) and file descriptors (/proc/self/fd)
// are counted before the run and after it, once every thread it started has
// been joined and every VM destroyed; the difference is what the run left.
// Threads are the project's own rather than /proc/self/task's entries
// because a sanitizer's runtime starts a thread of its own when the first
// thread is made, which would otherwise count as one the run left.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "workloads/nested_env.h"

namespace nestcache::workloads {

// The threads and open file descriptors of this process right now.
struct ProcessResources {
  int64_t threads = 0;  // threads started through host::start_thread and still running
  int64_t fds = 0;      // entries of /proc/self/fd (the directory's own descriptor not counted)
  uint64_t contexts = 0;  // nested contexts alive (vmx::VmxNestedContext::live_count)

  // Reads all three; -1 for a count /proc does not give.
  static ProcessResources now();
};

struct Teardown {
  uint64_t remap_windows_open = 0;  // windows opened and never closed
  uint64_t pins = 0;                // pins taken and never dropped
  uint64_t active_caches = 0;       // pfn caches still active after the machine went
  int64_t contexts = 0;             // nested contexts alive now minus alive before the run
  int64_t threads = 0;              // threads now minus threads before the run
  int64_t fds_leaked = 0;           // descriptors now minus descriptors before the run

  // Adds what one torn-down VM left (NestedEnv::tear_down's report).
  void add(const Leaks& l);
  // Adds the VM figures (windows, pins, caches) another tally holds.
  void add(const Teardown& vms);
  // Fills contexts, threads and fds_leaked from the process now against
  // `before`. Call once every VM is destroyed and every thread joined.
  void take_process(const ProcessResources& before);
  // True when every field is zero.
  bool none() const;
  // "0 remap windows open, 0 pins, 0 active caches, 0 contexts, 0 threads, 0 fds leaked".
  std::string to_string() const;
};

// {"remap_windows_open": 0, "pins": 0, "active_caches": 0, "contexts": 0,
//  "threads": 0, "fds_leaked": 0}
void to_json(nlohmann::json& j, const Teardown& t);
// Only the process-wide part, for runs that do not report their VMs'
// teardown: {"contexts": 0, "threads": 0, "fds_leaked": 0}.
nlohmann::json process_teardown_json(const Teardown& t);

}  // namespace nestcache::workloads
