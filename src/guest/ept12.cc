#include "guest/ept12.h"

#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestTask;

namespace {
constexpr uint64_t kEntryBytes = 8;
}  // namespace

uint64_t Ept12::eptp() const { return root_ | vmx::eptp::kMemTypeWb | vmx::eptp::kWalkLength4; }

GuestFn<uint64_t> Ept12::leaf_entry(Gpa l2_gpa, bool create) {
  Gpa table = root_;
  for (int level = vmx::ept::kLevels; level > 1; level--) {
    Gpa entry_gpa = table + vmx::ept::index(l2_gpa, level) * kEntryBytes;
    uint64_t entry = co_await ops::read64(entry_gpa);
    if (!vmx::ept::present(entry)) {
      if (!create) co_return 0;
      Gpa next = pages_.alloc();
      entry = next | vmx::ept::kReadWriteExecute;
      co_await ops::write64(entry_gpa, entry);
    }
    table = entry & vmx::ept::kAddressMask;
  }
  co_return table + vmx::ept::index(l2_gpa, 1) * kEntryBytes;
}

GuestTask Ept12::map(Gpa l2_gpa, Gpa l1_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, true);
  co_await ops::write64(e, (l1_gpa & kPageMask) | vmx::ept::kReadWriteExecute);
}

GuestTask Ept12::map_mmio(Gpa l2_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, true);
  co_await ops::write64(e, vmx::ept::kMmioLeaf);
}

GuestTask Ept12::unmap(Gpa l2_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, false);
  if (e) co_await ops::write64(e, 0);
}

GuestFn<uint64_t> Ept12::lookup(Gpa l2_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, false);
  if (!e) co_return 0;
  uint64_t entry = co_await ops::read64(e);
  co_return vmx::ept::present(entry) ? (entry & vmx::ept::kAddressMask) : 0;
}

}  // namespace nestcache::guest
