// VMX nested contexts (seed patch 9): the VM-wide table of patch 8 filled with
// contexts that each own one set of the five L1-page caches, so that the
// caches of an L2 stay mapped while L1 switches to another L2 or moves this
// one to another L1 vCPU (DESIGN.md §4 "Nested contexts").
//
//   VmxNestedContexts     one per VM, made by the cpu layer when the strategy is
//                      cache or oracle (with map there is no table: that is
//                      the kernel today). Owns the NestedContextTable and is
//                      its NestedContextOps.
//   VmxNestedContext   one context: a CacheBundle whose three hardware-used
//                      caches are bound to the vCPU that allocated it.
//
// NestedVmx calls load() on VMPTRLD of a new address and clear() on VMCLEAR,
// VMXOFF and vCPU teardown; the Machine calls destroy() at VM teardown, after
// every vCPU has stopped. A context handed to another vCPU (recycled, or an
// L2 migrated) keeps caches bound to its previous holder: CachePageSet
// re-binds each one to the loading vCPU when it locks it (patch 9, v4).
//
// Thread-safe: the table has its own lock; a context's caches are used only
// by the vCPU it is attached to (nested_context_table.h says when that holds).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "host/phys_mem.h"
#include "vm/vm.h"
#include "vmx/nested_context_table.h"
#include "vmx/page_strategy.h"

namespace nestcache::vmx {

class VmxNestedContext final : public NestedContext {
 public:
  // The caches start inactive; the hardware-used ones are bound to `vcpu`.
  VmxNestedContext(vm::Vm& vm, vm::Vcpu* vcpu, const host::HardwareView* hw);
  // Deactivates the five caches (unmaps, leaves the registry): patch 9's free.
  ~VmxNestedContext() override;

  // Contexts alive in the process, in every VM: 0 once every VM is torn
  // down, which is how a run proves that teardown freed them all.
  static uint64_t live_count();

  CacheBundle bundle;
};

class VmxNestedContexts final : public NestedContextOps {
 public:
  // `hw` non-null makes oracle caches (hardware-view mappings). Counts
  // nested_context_reuse / nested_context_recycle into vm.counters(), which
  // Machine::counters() includes. Capacity: 8 × vm.online_vcpus().
  VmxNestedContexts(vm::Vm& vm, const host::HardwareView* hw);
  ~VmxNestedContexts() override;

  // VMPTRLD of `vmptr` on `vcpu`: the context now attached to it for that
  // address, or nullptr when every context is attached (the vCPU then keeps
  // the cache set it has; the caches refresh because the gpa differs).
  // `taken_from`: as NestedContextTable::load.
  VmxNestedContext* load(vm::Vcpu& vcpu, Gpa vmptr, int* taken_from = nullptr);
  // VMCLEAR of `vmptr`: detach its context, whichever vCPU holds it; it stays
  // findable for a later load. Returns the vCPU it was detached from
  // (NestedContext::kDetached: none).
  int clear(vm::Vcpu& vcpu, Gpa vmptr);
  // `vcpu` stops using `vmptr` (VMXOFF, teardown, another eVMCS): detach its
  // context only if `vcpu` holds it (NestedContextTable::release).
  void release(vm::Vcpu& vcpu, Gpa vmptr);
  // VM teardown: frees every context, deactivating its caches. Requires that
  // no vCPU runs any more.
  void destroy() { table_.destroy(); }

  NestedContextTable& table() { return table_; }

  // NestedContextOps.
  std::unique_ptr<NestedContext> alloc(int vcpu_id) override;
  void reset(NestedContext& ctx) override;

 private:
  vm::Vm& vm_;
  const host::HardwareView* hw_;
  NestedContextTable table_;
};

}  // namespace nestcache::vmx
