// What one remap window costs L0 on this machine, measured the way modelled
// time measures L0 work (thread CPU time, DESIGN.md §5): a HostMap map and
// unmap of one page of the chosen memory kind — on unmanaged memory an mmap
// and a munmap of the frame (with the TLB shootdown the kernel sends), on
// managed memory a pin and a direct-map pointer. A benchmark prints it beside
// its rows so that a reader can check map − cache against windows × cost.
#pragma once

#include "base/error.h"
#include "workloads/options.h"

namespace nestcache::workloads {

// The average over `count` maps and unmaps, in nanoseconds; measured once
// per memory kind and process (later calls return the first figure).
// ENOMEM when no memory could be had for the measurement.
Result<double> remap_window_ns(MemoryKind memory, int count = 512);

}  // namespace nestcache::workloads
