#include "support/fault_sweep.h"

#include <fmt/format.h>

namespace nestcache::test_support {

std::vector<host::FaultSpec> sweep_faults(host::FaultSite site, uint64_t count, bool persistent) {
  const int error = host::parse_fault_spec(std::string(host::fault_site_name(site)) + ":1").value().error;
  std::vector<host::FaultSpec> faults;
  for (uint64_t n = 1; n <= count; n++) {
    faults.push_back({site, n, false, error});
    if (persistent) faults.push_back({site, n, true, error});
  }
  return faults;
}

std::string fault_label(const host::FaultSpec& f) {
  return fmt::format("{}:{}{}", host::fault_site_name(f.site), f.nth, f.and_later ? "+" : "");
}

bool names_resource(host::FaultSite site, const std::string& message) {
  auto has = [&](const char* word) { return message.find(word) != std::string::npos; };
  switch (site) {
    case host::FaultSite::mmap: return has("remap window") || has("mapping") || has("address space");
    case host::FaultSite::munmap: return has("munmap");
    case host::FaultSite::memfd: return has("memfd") || has("physical memory");
    case host::FaultSite::thread: return has("cannot start");
  }
  return false;
}

}  // namespace nestcache::test_support
