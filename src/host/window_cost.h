// What one remap window costs L0, for modelled time (DESIGN.md §5).
//
// A window is an mmap of one frame (MAP_POPULATE, so the page-table entry is
// made in the call) and, later, its munmap. The munmap's CPU time depends on
// the rest of the machine: it flushes the TLBs of the CPUs that run this
// process at that moment, sending them an interrupt and waiting for them, and
// only when another of the process's threads is on a CPU. Measured per call,
// a benchmark's window cost would then change with the host's load (a busy
// host preempts the sibling vCPU threads, and the munmap flushes only its
// own CPU). Benchmarks therefore charge every window a fixed cost, measured
// once per process under one stated condition: another thread of the
// process is running on another CPU, so every munmap pays one shootdown.
#pragma once

#include <cstdint>

#include "base/error.h"

namespace nestcache::host {

struct WindowCost {
  uint64_t open_ns = 0;   // the mmap, MAP_POPULATE
  uint64_t close_ns = 0;  // the munmap, with one other CPU to flush
  uint64_t total() const { return open_ns + close_ns; }
};

// How a calibration went: the figures, and how many of its samples met the
// condition (the sibling thread ran on another CPU throughout).
struct WindowCalibration {
  WindowCost cost;
  uint64_t samples = 0;        // window open/close pairs timed
  uint64_t concurrent = 0;     // of them, with the sibling running elsewhere
  bool condition_met = false;  // enough concurrent samples for the medians
};

// Measures the window cost: windows on a private memfd (not the project's
// pool, and not through the fault-injection seam), each mmap and munmap timed
// in the thread's CPU time while a sibling thread spins; the medians of the
// samples taken while the sibling ran on another CPU. On a one-CPU host, or
// when the sibling never ran alongside, the medians of all samples
// (condition_met false). Errors: memfd, mmap or thread failures (errno).
Result<WindowCalibration> calibrate_window_cost();

// calibrate_window_cost() once per process; later calls return the first
// result (a failure is retried).
Result<WindowCalibration> calibrated_window_cost();

}  // namespace nestcache::host
