// L1's VMX instructions and VMX bring-up: what L1 KVM does before it can run
// an L2 (VMXON, then a VMCS made current with VMCLEAR + VMPTRLD and filled
// with VMWRITEs), and its view of the exit L2 made.
//
// Everything here is guest code: it reaches memory and the VMX instructions
// only through GuestTask operations, so every step costs what the CPU model
// says it costs (VMX instructions exit to L0; memory accesses do not). The
// helpers that "must succeed" throw VmxError inside the guest when the
// instruction fails; the Machine reports it as the run's failure. Code that
// checks failures on purpose uses cpu::ops directly, which returns the
// OpResult.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "cpu/guest_task.h"
#include "guest/l1_pages.h"
#include "vmx/vmcs12.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

using cpu::GuestFn;
using cpu::GuestTask;
using cpu::OpResult;

// Thrown inside guest code when a VMX instruction L1 expected to succeed
// failed.
struct VmxError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs `op` (a VMX instruction) and returns its value; throws VmxError
// naming `what` and the outcome unless it succeeded.
GuestFn<uint64_t> vmx_ok(cpu::GuestOp op, const char* what);

// The VMX instructions, each required to succeed (VmxError otherwise).
GuestTask vmxon(Gpa region);
GuestTask vmxoff();
GuestTask vmclear(Gpa vmcs);
GuestTask vmptrld(Gpa vmcs);
GuestFn<uint64_t> vmptrst();
GuestFn<uint64_t> vmread(uint32_t field);
GuestTask vmwrite(uint32_t field, uint64_t value);
// VMLAUNCH / VMRESUME: return once L2 has exited back to L1.
GuestTask vmlaunch();
GuestTask vmresume();
GuestTask invept(vmx::InveptType type, uint64_t eptp);

// Writes the VMX revision identifier into a fresh VMXON or VMCS region.
GuestTask init_region(Gpa region);
// VMXON on a fresh region from `pages`.
GuestTask enter_vmx(L1Pages& pages);
// A fresh VMCS region from `pages`, cleared (VMCLEAR) and made current
// (VMPTRLD): L1 KVM's vmx_vcpu_create + vmx_vcpu_load. Returns its address.
GuestFn<Gpa> new_current_vmcs(L1Pages& pages);
// Both: VMXON, then a new current VMCS; returns the VMCS's address.
GuestFn<Gpa> enter_vmx_with_current_vmcs(L1Pages& pages);

// Writes every field of `v` that differs from zero with VMWRITE (read-only
// fields skipped): the way L1 fills its VMCS.
GuestTask write_vmcs(const vmx::Vmcs12& v);

// The exit-reason field of the last exit, from the current VMCS (VMREAD).
GuestFn<uint64_t> exit_reason();
// Its basic exit reason (bits 15:0).
GuestFn<vmx::ExitReason> basic_exit_reason();
// Throws VmxError unless the last exit was `expected`.
GuestTask expect_exit(vmx::ExitReason expected);

}  // namespace nestcache::guest
