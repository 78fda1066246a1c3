// The VMX instructions L0 emulates for L1 (SDM Vol. 3C ch. 30, KVM's
// handle_vmxon ... handle_invvpid): VMXON, VMXOFF, VMCLEAR, VMPTRLD, VMPTRST,
// VMREAD, VMWRITE, INVEPT and INVVPID. VMLAUNCH and VMRESUME are the nested
// entry (nested_entry.cc). Each ends in an OpResult: success, VMfailInvalid,
// VMfailValid with the SDM's error number, or #UD.
#include "vmx/nested.h"

#include "vmx/entry_checks.h"

namespace nestcache::vmx {

namespace {
// Bits 63:47 of a canonical linear address (4-level paging) are all equal.
bool canonical48(uint64_t la) { return static_cast<uint64_t>(static_cast<int64_t>(la << 16) >> 16) == la; }
}  // namespace

OpResult NestedVmx::fail_valid(VmInstructionError e, std::string message) {
  // VMfailValid needs a current VMCS to hold the error number (a vmcs12 or
  // the eVMCS in use); without one the SDM's VMfail is VMfailInvalid.
  if (current_ == kInvalidGpa && !evmcs_in_use()) return OpResult::fail_invalid(std::move(message));
  vmcs12_.set_vm_instruction_error(e);
  if (evmcs_in_use()) sync_vmcs12_to_evmcs();  // L1 reads the error in its page
  return OpResult::fail_valid(e, std::move(message));
}

OpResult NestedVmx::fail(const VmxFail& f) {
  if (f.kind == VmxFailKind::kFailValid) return fail_valid(f.error, f.to_string());
  return OpResult::fail_invalid(f.to_string());
}

Status NestedVmx::load_vmcs12(Gpa gpa) {
  std::array<std::byte, kPageSize> buf;
  NC_TRY(vm_.read_guest(gpa, buf.data(), buf.size()));
  vmcs12_ = Vmcs12::deserialize(buf);
  return ok();
}

Status NestedVmx::flush_vmcs12() {
  std::array<std::byte, kPageSize> buf;
  vmcs12_.serialize(buf);
  return vm_.write_guest(current_, buf.data(), buf.size());
}

OpResult NestedVmx::vmxon(Gpa region) {
  if (vmxon_) return fail_valid(VmInstructionError::kVmxonInVmxRoot, "VMXON in VMX root operation");
  if (!page_address_valid(region))
    return OpResult::fail_invalid(fmt::format("VMXON region {:#x} is misaligned or too wide", region));
  uint32_t rev = 0;
  if (!vm_.read_guest(region, &rev, sizeof rev))
    return OpResult::fail_invalid(fmt::format("VMXON region {:#x} is not guest memory", region));
  // All 32 bits: the revision in 30:0, and bit 31 must be 0 (SDM 31.3
  // VMXON; KVM's handle_vmxon compares the whole word).
  if (rev != kVmcs12Revision)
    return OpResult::fail_invalid(fmt::format("VMXON region revision {:#x} is not {:#x}", rev, kVmcs12Revision));
  vmxon_ = true;
  vmxon_ptr_ = region;
  current_ = kInvalidGpa;
  return OpResult::success();
}

OpResult NestedVmx::vmxoff() {
  if (!vmxon_) return OpResult::undefined("VMXOFF outside VMX operation");
  release_nested();
  vmxon_ = false;
  vmxon_ptr_ = kInvalidGpa;
  return OpResult::success();
}

OpResult NestedVmx::vmclear(Gpa gpa) {
  if (!vmxon_) return OpResult::undefined("VMCLEAR outside VMX operation");
  if (!page_address_valid(gpa))
    return fail_valid(VmInstructionError::kVmclearInvalidAddress, fmt::format("VMCLEAR of bad address {:#x}", gpa));
  if (gpa == vmxon_ptr_) return fail_valid(VmInstructionError::kVmclearVmxonPointer, "VMCLEAR of the VMXON pointer");
  if (evmcs_enabled_ && vp_assist_evmptr()) {
    // KVM: with enlightened entry on, the region may be an eVMCS, which has
    // no launch state to write; clearing the eVMCS in use releases it.
    if (gpa == evmcs_gpa_) release_evmcs();
  } else if (gpa == current_) {
    vmcs12_.launch_state = kLaunchStateClear;
    (void)flush_vmcs12();
    current_ = kInvalidGpa;
  } else {
    // Not current: the processor only writes the launch state into the region.
    uint32_t clear = kLaunchStateClear;
    (void)vm_.write_guest(gpa + 8, &clear, sizeof clear);
  }
  clear_context(gpa);  // patch 9: detach, to the LRU tail
  return OpResult::success();
}

OpResult NestedVmx::vmptrld(Gpa gpa) {
  if (!vmxon_) return OpResult::undefined("VMPTRLD outside VMX operation");
  if (!page_address_valid(gpa))
    return fail_valid(VmInstructionError::kVmptrldInvalidAddress, fmt::format("VMPTRLD of bad address {:#x}", gpa));
  if (gpa == vmxon_ptr_) return fail_valid(VmInstructionError::kVmptrldVmxonPointer, "VMPTRLD of the VMXON pointer");
  // KVM forbids VMPTRLD once an eVMCS is in use (it leaves the instruction
  // unexecuted and L1 loops on it); nestcache fails it so L1 sees why.
  if (evmcs_in_use())
    return OpResult::fail_invalid(fmt::format("VMPTRLD of {:#x} while the enlightened VMCS {:#x} is in use", gpa, evmcs_gpa_));
  // The current VMCS again: nothing is read or checked (KVM's handle_vmptrld).
  if (gpa == current_) return OpResult::success();
  // A region without memory reads as all ones, which is no revision
  // identifier: error 11, as KVM answers when no memslot backs it.
  uint32_t rev = ~uint32_t{0};
  (void)vm_.read_guest(gpa, &rev, sizeof rev);
  if (rev != kVmcs12Revision)  // bit 31 (shadow VMCS) is not supported either
    return fail_valid(VmInstructionError::kVmptrldIncorrectRevision,
                      fmt::format("VMCS revision {:#x} at {:#x} is not {:#x}", rev, gpa, kVmcs12Revision));
  if (current_ != kInvalidGpa) (void)flush_vmcs12();
  current_ = kInvalidGpa;
  if (!load_vmcs12(gpa))
    return fail_valid(VmInstructionError::kVmptrldIncorrectRevision, fmt::format("VMPTRLD of {:#x}: unreadable", gpa));
  current_ = gpa;
  load_context(gpa);  // patch 9: set_current_vmptr loads the context
  return OpResult::success();
}

OpResult NestedVmx::vmptrst() {
  if (!vmxon_) return OpResult::undefined("VMPTRST outside VMX operation");
  // With an eVMCS in use there is no current VMCS pointer: all ones. KVM
  // leaves the instruction unexecuted instead (the TLFS does not support
  // VMPTRST then); docs/kvm-differences.md.
  return OpResult::success(current_ == kInvalidGpa ? ~uint64_t{0} : current_);
}

OpResult NestedVmx::vmread(uint32_t f) {
  if (!vmxon_) return OpResult::undefined("VMREAD outside VMX operation");
  if (evmcs_in_use()) {
    // KVM's Windows 11 workaround: VMREAD reads the eVMCS page itself
    // (through the strategy: patch 7 locks it). L2's VMREADs exit to L1.
    VmxResult<uint64_t> v = tl::unexpected(VmxFail::invalid("the enlightened VMCS cannot be mapped"));
    Status st = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
      v = evmcs_vmread(EvmcsPage::load(std::span<const std::byte, kPageSize>(view.bytes(), kPageSize)), f);
    });
    if (!st) counters_.add(Counter::evmcs_map_failures);
    if (!v) return fail(v.error());
    return OpResult::success(*v);
  }
  if (current_ == kInvalidGpa) return OpResult::fail_invalid("VMREAD without a current VMCS");
  auto v = vmcs12_.read(f);
  if (!v) return fail(v.error());
  return OpResult::success(*v);
}

OpResult NestedVmx::vmwrite(uint32_t f, uint64_t value) {
  if (!vmxon_) return OpResult::undefined("VMWRITE outside VMX operation");
  if (evmcs_in_use()) return fail(evmcs_vmwrite(f).error());
  if (current_ == kInvalidGpa) return OpResult::fail_invalid("VMWRITE without a current VMCS");
  auto st = vmcs12_.write(f, value, kModelVmcsAccess);
  if (!st) return fail(st.error());
  return OpResult::success();
}

OpResult NestedVmx::invept(uint64_t type, uint64_t eptp) {
  if (!vmxon_) return OpResult::undefined("INVEPT outside VMX operation");
  if (type != 1 && type != 2)  // single-context, all-context
    return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand, fmt::format("INVEPT type {} unsupported", type));
  // Single-context names an EPTP, which must be one an entry would accept.
  if (type == 1) {
    if (VmxStatus st = check_ept_pointer(eptp); !st)
      return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand,
                        fmt::format("INVEPT single-context: {}", st.error().message));
  }
  vcpu_.make_request(vm::Request::kTlbFlushGuest);
  return OpResult::success();
}

OpResult NestedVmx::invvpid(uint64_t type, uint16_t vpid, uint64_t gla) {
  if (!vmxon_) return OpResult::undefined("INVVPID outside VMX operation");
  if (type > 3) return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand, fmt::format("INVVPID type {} unsupported", type));
  if ((type == 0 || type == 1 || type == 3) && vpid == 0)
    return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand, "INVVPID of VPID 0");
  if (type == 0 && !canonical48(gla))
    return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand,
                      fmt::format("INVVPID individual-address of {:#x}, which is not canonical", gla));
  vcpu_.make_request(vm::Request::kTlbFlushGuest);
  return OpResult::success();
}

}  // namespace nestcache::vmx
