// Fault sweeps: learn how many operations a step makes at a host fault site
// (host/fault_injection.h, counting without failing), then run the step
// once per operation with that operation failing — once, and for the
// mapping sites also from it on — so no failure point is left untried.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "host/fault_injection.h"

namespace nestcache::test_support {

// Arms counting at `site`, runs `step`, and returns how many operations it
// made there (the seam is cleared afterwards).
template <class Step>
uint64_t count_site_operations(host::FaultSite site, Step&& step) {
  host::count_operations(site);
  step();
  const uint64_t n = host::operations(site);
  host::clear_faults();
  return n;
}

// Every fault a sweep over `count` operations at `site` injects: the Nth
// operation failing once for N in 1..count and, with `persistent`, the Nth
// and every later one too. The errno is the site's default.
std::vector<host::FaultSpec> sweep_faults(host::FaultSite site, uint64_t count, bool persistent);

// "mmap:3", "munmap:2+" — the spec as --inject-fault spells it.
std::string fault_label(const host::FaultSpec& f);

// The words an error caused by a fault at `site` must contain to name the
// resource: "remap window", "mapping" or "address space" for mmap, "munmap" for munmap,
// "memfd" or "physical memory" for memfd, "cannot start" for thread.
bool names_resource(host::FaultSite site, const std::string& message);

}  // namespace nestcache::test_support
