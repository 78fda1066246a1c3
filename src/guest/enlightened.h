// The enlightened L1 (Hyper-V eVMCS, TLFS): an L1 that does not VMPTRLD or
// VMWRITE. It names its eVMCS in its VP-assist page and writes fields
// straight into the eVMCS page, clearing the clean bit of each group it
// changes; it reads the exit information with plain loads from the page.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"
#include "vmx/vmcs12.h"

namespace nestcache::guest {

// WRMSR HV_X64_MSR_VP_ASSIST_PAGE: enable the VP-assist page at `page`.
cpu::GuestTask enable_vp_assist(Gpa page);
// Makes `evmcs` the current eVMCS: "enlightened VM-entry" on and its address
// in the VP-assist page (the KVM selftests' load_evmcs).
cpu::GuestTask load_evmcs(Gpa vp_assist, Gpa evmcs);
// Writes the eVMCS revision (version 1) into a fresh eVMCS page.
cpu::GuestTask init_evmcs(Gpa evmcs);
// Stores one field into the eVMCS and clears its group's clean bit. Throws
// VmxError for a field the eVMCS does not carry.
cpu::GuestTask evmcs_write(Gpa evmcs, uint32_t field, uint64_t value);
// Loads one field from the eVMCS, zero-extended.
cpu::GuestFn<uint64_t> evmcs_read(Gpa evmcs, uint32_t field);
// Writes every L1-writable field the eVMCS carries from `v` (zeros too) and
// turns `enlightenments` (evmcs_enlightenment bits) on: what the selftests'
// prepare_vmcs does with an eVMCS current.
cpu::GuestTask write_evmcs(Gpa evmcs, const vmx::Vmcs12& v, uint32_t enlightenments = 0);

}  // namespace nestcache::guest
