// EPT12: the 4-level tables in L1 memory through which L1 maps L2
// guest-physical pages onto its own (4 KiB pages, read/write/execute), as L1
// KVM's TDP MMU does for its nested guest. L0 walks them (then EPT01) on
// every L2 access the translation caches miss.
#pragma once

#include "cpu/guest_task.h"
#include "guest/l1_pages.h"

namespace nestcache::guest {

class Ept12 {
 public:
  // The root table comes from `pages`, which also supplies the tables map()
  // adds; `pages` must outlive this.
  explicit Ept12(L1Pages& pages) : pages_(pages), root_(pages.alloc()) {}
  Gpa root() const { return root_; }
  // The EPT pointer for vmcs12: WB memory type, 4-level walk.
  uint64_t eptp() const;
  // Maps l2_gpa -> l1_gpa, allocating intermediate tables as needed.
  cpu::GuestTask map(Gpa l2_gpa, Gpa l1_gpa);
  // Gives l2_gpa a misconfigured leaf (vmx::ept::kMmioLeaf): every L2
  // access to it exits to L1 as an EPT misconfiguration, which L1 emulates
  // (an emulated device's register, such as a virtio doorbell).
  cpu::GuestTask map_mmio(Gpa l2_gpa);
  // Removes the mapping of l2_gpa (the caller then runs INVEPT).
  cpu::GuestTask unmap(Gpa l2_gpa);
  // The L1 address l2_gpa maps to, or 0.
  cpu::GuestFn<uint64_t> lookup(Gpa l2_gpa);

 private:
  // The L1 address of l2_gpa's leaf entry; 0 if a table on the way is
  // missing and `create` is false.
  cpu::GuestFn<uint64_t> leaf_entry(Gpa l2_gpa, bool create);
  L1Pages& pages_;
  Gpa root_;
};

}  // namespace nestcache::guest
