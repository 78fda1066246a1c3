// What one remap window costs L0 in modelled time (DESIGN.md §5).
//
// Modelled time charges every window's mmap and munmap a fixed cost (see
// host/window_cost.h for why a per-call measurement would follow the host's
// load): the one calibrated once per process, or the one --window-cost-ns
// names. A benchmark prints the resulting cost of a whole HostMap map and
// unmap beside its rows, so that a reader can check map − cache against
// windows × cost.
#pragma once

#include <optional>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "host/window_cost.h"
#include "workloads/options.h"

namespace nestcache::workloads {

// The cost modelled time charges per window: `override_ns` split evenly
// between the mmap and the munmap, or, without it, the calibrated cost.
// Errors: the calibration's (memfd, mmap, thread start).
Result<host::WindowCost> modelled_window_cost(std::optional<uint64_t> override_ns);

// What one HostMap map + unmap of a page of `o.memory` costs the way `o`'s
// clock counts it: on unmanaged memory the window (in modelled time the
// fixed cost modelled_window_cost(o.window_cost_ns), on the wall clock its
// CPU time) and the fault-in; on managed memory a pin and a direct-map
// pointer instead of a window. The average over `count`; measured once per
// memory kind, window cost and process. ENOMEM when no memory could be had
// for the measurement.
Result<double> remap_window_ns(const BenchOptions& o, int count = 512);

// {"open_ns", "close_ns", "source": "calibrated"|"--window-cost-ns", and,
// when calibrated, "samples", "concurrent_samples", "sibling_ran"}.
Result<nlohmann::json> window_cost_json(std::optional<uint64_t> override_ns);

}  // namespace nestcache::workloads
