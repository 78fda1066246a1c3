// Building blocks of the L1 mini-hypervisor (DESIGN.md §6): guest code that
// runs on L1's vCPUs and does what L1 KVM does to run an L2 — allocate its
// own pages, make a VMCS current and fill it with VMWRITEs, build EPT12
// tables in its memory, post interrupts to L2.
//
// Everything here is guest code: it reaches memory and the VMX instructions
// only through GuestTask operations, so every step costs what the CPU model
// says it costs (VMX instructions exit to L0; memory accesses do not).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/guest_task.h"
#include "vmx/vmcs12.h"

namespace nestcache::guest {

using cpu::GuestFn;
using cpu::GuestTask;
using cpu::OpResult;

// Thrown inside guest code when a VMX instruction L1 expected to succeed
// failed; the Machine reports it as the run's failure.
struct VmxError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// L1's own page allocator: a bump allocator over a range of its physical
// memory (L1 bookkeeping, as a kernel's page allocator is).
class L1Pages {
 public:
  L1Pages(Gpa first, Gpa end) : next_(first), end_(end) {}
  // The next free page (not zeroed: fresh guest memory is zero).
  Gpa alloc();
  Gpa alloc(size_t pages);
  Gpa next() const { return next_; }

 private:
  Gpa next_;
  Gpa end_;
};

// Runs a VMX instruction and throws VmxError unless it succeeded.
GuestFn<uint64_t> vmx_ok(cpu::GuestOp op, const char* what);
GuestTask vmwrite(uint32_t field, uint64_t value);
GuestFn<uint64_t> vmread(uint32_t field);

// Writes the VMX revision identifier into a fresh VMXON or VMCS region.
GuestTask init_region(Gpa region);

// VMXON on a fresh region from `pages`.
GuestTask enter_vmx(L1Pages& pages);

// Writes every field of `v` that differs from zero with VMWRITE (read-only
// fields skipped): the way L1 fills its VMCS.
GuestTask write_vmcs(const vmx::Vmcs12& v);

// EPT12: 4-level tables in L1 memory that map L2 guest-physical pages onto
// L1 guest-physical pages (4 KiB pages, read/write/execute).
class Ept12 {
 public:
  explicit Ept12(L1Pages& pages) : pages_(pages), root_(pages.alloc()) {}
  Gpa root() const { return root_; }
  // The EPT pointer for vmcs12: WB memory type, 4-level walk.
  uint64_t eptp() const;
  // Maps l2_gpa -> l1_gpa, allocating intermediate tables as needed.
  GuestTask map(Gpa l2_gpa, Gpa l1_gpa);
  // Removes the mapping of l2_gpa (the caller then runs INVEPT).
  GuestTask unmap(Gpa l2_gpa);
  // The L1 address l2_gpa maps to, or 0.
  GuestFn<uint64_t> lookup(Gpa l2_gpa);

 private:
  GuestFn<uint64_t> leaf_entry(Gpa l2_gpa, bool create);
  L1Pages& pages_;
  Gpa root_;
};

// The exit reason of the last exit, from vmcs12.
GuestFn<uint64_t> exit_reason();

// --- Enlightened L1 (Hyper-V eVMCS, TLFS) -----------------------------------
// An enlightened L1 does not VMPTRLD or VMWRITE: it names its eVMCS in its
// VP-assist page and writes fields straight into the eVMCS page, clearing
// the clean bit of each group it changes. Its reads of the exit information
// are plain loads from the page.

// WRMSR HV_X64_MSR_VP_ASSIST_PAGE: enable the VP-assist page at `page`.
GuestTask enable_vp_assist(Gpa page);
// Makes `evmcs` the current eVMCS: "enlightened VM-entry" on and its address
// in the VP-assist page (the KVM selftests' load_evmcs).
GuestTask load_evmcs(Gpa vp_assist, Gpa evmcs);
// Writes the eVMCS revision (version 1) into a fresh eVMCS page.
GuestTask init_evmcs(Gpa evmcs);
// Stores one field into the eVMCS and clears its group's clean bit. Throws
// VmxError for a field the eVMCS does not carry.
GuestTask evmcs_write(Gpa evmcs, uint32_t field, uint64_t value);
// Loads one field from the eVMCS, zero-extended.
GuestFn<uint64_t> evmcs_read(Gpa evmcs, uint32_t field);
// Writes every L1-writable field the eVMCS carries from `v` (zeros too) and
// turns `enlightenments` (evmcs_enlightenment bits) on: what the selftests'
// prepare_vmcs does with an eVMCS current.
GuestTask write_evmcs(Gpa evmcs, const vmx::Vmcs12& v, uint32_t enlightenments = 0);

}  // namespace nestcache::guest
