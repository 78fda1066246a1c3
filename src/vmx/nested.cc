#include "vmx/nested.h"

#include <cstring>

#include "base/check.h"
#include "vmx/entry_checks.h"
#include "vmx/nested_contexts.h"

namespace nestcache::vmx {

namespace {
constexpr uint32_t kRevisionMask = 0x7fffffff;
using Kind = InstrResult::Kind;
}  // namespace

NestedVmx::NestedVmx(vm::Vm& vm, vm::Vcpu& vcpu, StrategyKind strategy, const host::HardwareView* hw,
                     CounterSet& counters, NestedContexts* contexts)
    : vm_(vm),
      vcpu_(vcpu),
      counters_(counters),
      pages_(make_page_set(strategy, vm, vcpu, counters, hw)),
      contexts_(strategy == StrategyKind::map ? nullptr : contexts) {}

NestedVmx::~NestedVmx() { release_nested(); }

// --- helpers ---------------------------------------------------------------------

InstrResult NestedVmx::fail_valid(VmInstructionError e, std::string message) {
  // VMfailValid needs a current VMCS to hold the error number (a vmcs12 or
  // the eVMCS in use); without one the SDM's VMfail is VMfailInvalid.
  if (current_ == kInvalidGpa && !evmcs_in_use())
    return {Kind::fail_invalid, 0, VmInstructionError::kNone, std::move(message)};
  vmcs12_.set_vm_instruction_error(e);
  if (evmcs_in_use()) sync_vmcs12_to_evmcs();  // L1 reads the error in its page
  return {Kind::fail_valid, 0, e, std::move(message)};
}

InstrResult NestedVmx::fail(const VmxFail& f) {
  if (f.kind == VmxFailKind::kFailValid) return fail_valid(f.error, f.to_string());
  return {Kind::fail_invalid, 0, VmInstructionError::kNone, f.to_string()};
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

void NestedVmx::release_nested() {
  release_evmcs();  // its context is cleared like the vmcs12's below
  if (current_ != kInvalidGpa) (void)flush_vmcs12();
  // Patch 9 (v4): free_nested clears the current context; its caches stay
  // mapped in the table for whichever vCPU loads it next.
  clear_context(current_);
  // A context kept from an earlier vmcs12 (a load found every context
  // attached) is this vCPU's too: detach it as well.
  if (ctx_) clear_context(ctx_->key());
  current_ = kInvalidGpa;
  guest_mode_ = false;
  pages_->release();
}

// --- nested contexts ----------------------------------------------------------------

void NestedVmx::load_context(Gpa vmptr) {
  if (!contexts_) return;
  // Found, new or recycled: the context's caches serve this vmcs12 from now
  // on. nullptr (every context attached): keep the current set, which the
  // next entry re-activates at this vmcs12's addresses.
  if (VmxNestedContext* ctx = contexts_->load(vcpu_, vmptr)) {
    ctx_ = ctx;
    pages_->use_bundle(&ctx->bundle);
  }
}

void NestedVmx::clear_context(Gpa vmptr) {
  if (!contexts_ || vmptr == kInvalidGpa) return;
  contexts_->clear(vcpu_, vmptr);
  // A detached context belongs to the table (another vCPU may recycle it at
  // any moment), so stop using its caches. The seed keeps the stale pointers
  // until the next load; going back to the vCPU's own set costs nothing
  // until that set is used.
  if (ctx_ && ctx_->key() == vmptr) {
    ctx_ = nullptr;
    pages_->use_bundle(nullptr);
  }
}

// --- VMX instructions ------------------------------------------------------------------

InstrResult NestedVmx::vmxon(Gpa region) {
  if (vmxon_) return fail_valid(VmInstructionError::kVmxonInVmxRoot, "VMXON in VMX root operation");
  if (!page_address_valid(region))
    return {Kind::fail_invalid, 0, {}, fmt::format("VMXON region {:#x} is misaligned or too wide", region)};
  uint32_t rev = 0;
  if (!vm_.read_guest(region, &rev, sizeof rev))
    return {Kind::fail_invalid, 0, {}, fmt::format("VMXON region {:#x} is not guest memory", region)};
  if ((rev & kRevisionMask) != kVmcs12Revision)
    return {Kind::fail_invalid, 0, {}, fmt::format("VMXON region revision {:#x} is not {:#x}", rev, kVmcs12Revision)};
  vmxon_ = true;
  vmxon_ptr_ = region;
  current_ = kInvalidGpa;
  return InstrResult::success();
}

InstrResult NestedVmx::vmxoff() {
  if (!vmxon_) return InstrResult::undefined("VMXOFF outside VMX operation");
  release_nested();
  vmxon_ = false;
  vmxon_ptr_ = kInvalidGpa;
  return InstrResult::success();
}

InstrResult NestedVmx::vmclear(Gpa gpa) {
  if (!vmxon_) return InstrResult::undefined("VMCLEAR outside VMX operation");
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
  return InstrResult::success();
}

InstrResult NestedVmx::vmptrld(Gpa gpa) {
  if (!vmxon_) return InstrResult::undefined("VMPTRLD outside VMX operation");
  if (!page_address_valid(gpa))
    return fail_valid(VmInstructionError::kVmptrldInvalidAddress, fmt::format("VMPTRLD of bad address {:#x}", gpa));
  if (gpa == vmxon_ptr_) return fail_valid(VmInstructionError::kVmptrldVmxonPointer, "VMPTRLD of the VMXON pointer");
  // KVM forbids VMPTRLD once an eVMCS is in use (it leaves the instruction
  // unexecuted and L1 loops on it); nestcache fails it so L1 sees why.
  if (evmcs_in_use())
    return {Kind::fail_invalid, 0, {}, fmt::format("VMPTRLD of {:#x} while the enlightened VMCS {:#x} is in use", gpa, evmcs_gpa_)};
  uint32_t rev = 0;
  if (!vm_.read_guest(gpa, &rev, sizeof rev))
    return fail_valid(VmInstructionError::kVmptrldInvalidAddress, fmt::format("VMPTRLD of {:#x}: not guest memory", gpa));
  if (rev != kVmcs12Revision)  // bit 31 (shadow VMCS) is not supported either
    return fail_valid(VmInstructionError::kVmptrldIncorrectRevision,
                      fmt::format("VMCS revision {:#x} is not {:#x}", rev, kVmcs12Revision));
  if (gpa != current_) {
    if (current_ != kInvalidGpa) (void)flush_vmcs12();
    current_ = kInvalidGpa;
    if (!load_vmcs12(gpa))
      return fail_valid(VmInstructionError::kVmptrldInvalidAddress, fmt::format("VMPTRLD of {:#x}: unreadable", gpa));
    current_ = gpa;
    load_context(gpa);  // patch 9: set_current_vmptr loads the context
  }
  return InstrResult::success();
}

InstrResult NestedVmx::vmptrst() {
  if (!vmxon_) return InstrResult::undefined("VMPTRST outside VMX operation");
  // With an eVMCS in use there is no current VMCS pointer: all ones (KVM
  // WARNs; the TLFS does not support VMPTRST then).
  return InstrResult::success(current_ == kInvalidGpa ? ~uint64_t{0} : current_);
}

InstrResult NestedVmx::vmread(uint32_t f) {
  if (!vmxon_) return InstrResult::undefined("VMREAD outside VMX operation");
  if (evmcs_in_use()) {
    // KVM's Windows 11 workaround: VMREAD reads the eVMCS page itself
    // (through the strategy: patch 7 locks it). L2's VMREADs exit to L1.
    VmxResult<uint64_t> v = tl::unexpected(VmxFail::invalid("the enlightened VMCS cannot be mapped"));
    Status st = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
      v = evmcs_vmread(EvmcsPage::load(std::span<const std::byte, kPageSize>(view.bytes(), kPageSize)), f);
    });
    if (!st) counters_.add(Counter::evmcs_map_failures);
    if (!v) return fail(v.error());
    return InstrResult::success(*v);
  }
  if (current_ == kInvalidGpa) return {Kind::fail_invalid, 0, {}, "VMREAD without a current VMCS"};
  auto v = vmcs12_.read(f);
  if (!v) return fail(v.error());
  return InstrResult::success(*v);
}

InstrResult NestedVmx::vmwrite(uint32_t f, uint64_t value) {
  if (!vmxon_) return InstrResult::undefined("VMWRITE outside VMX operation");
  if (evmcs_in_use()) return fail(evmcs_vmwrite(f).error());
  if (current_ == kInvalidGpa) return {Kind::fail_invalid, 0, {}, "VMWRITE without a current VMCS"};
  auto st = vmcs12_.write(f, value);
  if (!st) return fail(st.error());
  return InstrResult::success();
}

InstrResult NestedVmx::invept(uint64_t type, uint64_t eptp) {
  if (!vmxon_) return InstrResult::undefined("INVEPT outside VMX operation");
  if (type != 1 && type != 2)  // single-context, all-context
    return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand, fmt::format("INVEPT type {} unsupported", type));
  vcpu_.make_request(vm::Request::kTlbFlushGuest);
  return InstrResult::success();
}

InstrResult NestedVmx::invvpid(uint64_t type, uint16_t vpid) {
  if (!vmxon_) return InstrResult::undefined("INVVPID outside VMX operation");
  if (type > 3) return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand, fmt::format("INVVPID type {} unsupported", type));
  if ((type == 0 || type == 1 || type == 3) && vpid == 0)
    return fail_valid(VmInstructionError::kInvalidInveptInvvpidOperand, "INVVPID of VPID 0");
  vcpu_.make_request(vm::Request::kTlbFlushGuest);
  return InstrResult::success();
}

// --- nested entry: checks -> get pages -> build vmcs02 -> guest mode --------------------

EntryResult NestedVmx::enter(bool launch) {
  const char* insn = launch ? "VMLAUNCH" : "VMRESUME";
  if (!vmxon_) return {EntryResult::Kind::failed, InstrResult::undefined(fmt::format("{} outside VMX operation", insn)), {}};
  // 0. The enlightened VMPTRLD (patches 6-7): with an eVMCS in use, vmcs12
  // now holds its dirty groups and the snapshot decides the rest.
  std::string why;
  switch (handle_enlightened_vmptrld(launch, why)) {
    case Evmptrld::error:
      return {EntryResult::Kind::failed, InstrResult::undefined(fmt::format("{}: {}", insn, why)), {}};
    case Evmptrld::vmfail:
      return {EntryResult::Kind::failed, {Kind::fail_invalid, 0, {}, fmt::format("{}: {}", insn, why)}, {}};
    case Evmptrld::disabled:
    case Evmptrld::succeeded:
      break;
  }
  if (current_ == kInvalidGpa && !evmcs_in_use())
    return {EntryResult::Kind::failed, {Kind::fail_invalid, 0, {}, fmt::format("{} without a current VMCS", insn)}, {}};
  if (launch && vmcs12_.launched())
    return {EntryResult::Kind::failed, fail_valid(VmInstructionError::kVmlaunchNonClearVmcs, "VMLAUNCH of a launched VMCS"), {}};
  if (!launch && !vmcs12_.launched())
    return {EntryResult::Kind::failed,
            fail_valid(VmInstructionError::kVmresumeNonLaunchedVmcs, "VMRESUME of a VMCS that was never launched"), {}};

  // 1. Consistency checks on controls, host state and guest state (and the
  // controls an eVMCS cannot express).
  VmxStatus checked = check_vm_entry(vmcs12_);
  if (checked && evmcs_in_use()) checked = check_evmcs_controls(vmcs12_);
  if (auto& st = checked; !st) {
    if (st.error().kind == VmxFailKind::kEntryFailure) {
      ExitInfo e = ExitInfo::of(st.error().exit_reason, st.error().qualification);
      e.exit_reason |= kExitReasonEntryFailure;
      vmcs12_.set_exit_info(e);
      if (evmcs_in_use()) sync_vmcs12_to_evmcs();
      return {EntryResult::Kind::exit_to_l1, InstrResult::success(), st.error().to_string()};
    }
    return {EntryResult::Kind::failed, fail(st.error()), {}};
  }

  // 2-3. Get vmcs12 pages through the strategy, build vmcs02.
  if (auto st = get_vmcs12_pages(); !st) {
    pages_->put();
    return {EntryResult::Kind::internal_error, InstrResult::success(), st.error().to_string()};
  }
  if (vmcs02_.vapic_bad_address) {
    // KVM writes an invalid address into vmcs02, and the hardware entry
    // fails on it: L1 sees VMfailValid(7).
    pages_->put();
    return {EntryResult::Kind::failed,
            fail_valid(VmInstructionError::kEntryInvalidControlFields, "virtual-APIC page has no backing"), {}};
  }
  guest_mode_ = true;
  if (launch) vmcs12_.launch_state = kLaunchStateLaunched;
  if (evmcs_in_use()) mark_evmcs_clean();
  counters_.add(Counter::nested_entries);
  // 4. The last check happens in the run loop, with the vCPU in guest mode.
  return {EntryResult::Kind::entered, InstrResult::success(), {}};
}

Status NestedVmx::get_vmcs12_pages() {
  // Build into a copy and install it only whole: a failure half-way must not
  // leave vmcs02 with the controls of one build and the pfns of another.
  const Vmcs12& v = vmcs12_;
  Vmcs02 o = vmcs02_;
  o.pin = v.pin_based_controls;
  o.proc = v.primary_proc_controls;
  o.proc2 = (v.primary_proc_controls & proc::kActivateSecondaryControls) ? v.secondary_proc_controls : 0;
  o.tpr_threshold = v.tpr_threshold;
  o.pi_notification_vector = v.posted_intr_notification_vector;
  o.eptp12 = v.ept_pointer & kPageMask;
  o.vpid = v.virtual_processor_id;
  o.apic_access = {};
  o.vapic = {};
  o.vapic_bad_address = false;
  o.pi_desc = {};

  if (o.proc2 & proc2::kVirtualizeApicAccesses) {
    auto hw = pages_->get_hw(L1Page::apic_access, v.apic_access_addr);
    if (!hw) return errorf(EFAULT, "no backing for APIC-access address {:#x}: {}", v.apic_access_addr, hw.error().message);
    o.apic_access = *hw;
  }
  if (o.proc & proc::kUseTprShadow) {
    auto hw = pages_->get_hw(L1Page::vapic, v.virtual_apic_page_addr);
    if (hw) {
      o.vapic = *hw;
    } else if ((o.proc & proc::kCr8LoadExiting) && (o.proc & proc::kCr8StoreExiting) &&
               !(o.proc2 & proc2::kVirtualizeApicAccesses)) {
      o.proc &= ~proc::kUseTprShadow;  // every CR8 access exits instead
    } else {
      o.vapic_bad_address = true;
    }
  }
  if (o.pin & pin::kPostedInterrupts) {
    auto hw = pages_->get_hw(L1Page::pi_desc, v.posted_intr_desc_addr);
    if (hw)
      o.pi_desc = *hw;
    else
      o.pin &= ~pin::kPostedInterrupts;  // the internal error waits until L0 needs the descriptor
  }
  merge_msr_bitmap(o);
  o.generation++;
  vmcs02_ = o;
  return ok();
}

void NestedVmx::merge_msr_bitmap(Vmcs02& o) {
  if (!(vmcs12_.primary_proc_controls & proc::kUseMsrBitmaps)) {
    o.use_msr_bitmap = false;
    return;
  }
  // eVMCS: L1 promised (MSR-bitmap enlightenment) to clear the MSR_BITMAP
  // clean bit whenever it changes its bitmap; clean in this entry's
  // snapshot, the merged bitmap L0 already has still holds.
  if (evmcs_in_use() && !force_msr_bitmap_recalc_ && evmcs_snap_.msr_bitmap_unchanged()) {
    o.use_msr_bitmap = true;
    return;
  }
  // L0 intercepts nothing of its own, so the merge is L1's bitmap as is.
  Status st = pages_->access(L1Page::msr_bitmap, vmcs12_.msr_bitmap & kPageMask, [&](const PageView& view) {
    std::memcpy(o.msr_bitmap.data(), view.bytes(), kPageSize);
  });
  // KVM's fallback: an unusable bitmap means vmcs02 uses none (all MSRs exit).
  o.use_msr_bitmap = static_cast<bool>(st);
  if (st) force_msr_bitmap_recalc_ = false;
}

bool NestedVmx::last_check_fails() const { return guest_mode_ && pages_->any_invalid(); }

Status NestedVmx::refresh_guest_pages() {
  if (!guest_mode_) return ok();
  NC_TRY(get_vmcs12_pages());
  // KVM's invalid-address fallback for the virtual-APIC page makes the
  // hardware entry fail; L2 cannot run on this vmcs02.
  if (vmcs02_.vapic_bad_address) return errorf(EFAULT, "virtual-APIC page {:#x} has no backing", vmcs12_.virtual_apic_page_addr);
  return ok();
}

// --- nested exit ----------------------------------------------------------------------------

ExitTarget NestedVmx::route_exit(const ExitInfo& exit, uint32_t msr) const {
  const Vmcs12& v = vmcs12_;
  switch (basic_exit_reason(exit.exit_reason)) {
    case ExitReason::kMsrRead:
    case ExitReason::kMsrWrite: {
      if (!(v.primary_proc_controls & proc::kUseMsrBitmaps)) return ExitTarget::l1;
      bool write = basic_exit_reason(exit.exit_reason) == ExitReason::kMsrWrite;
      int64_t byte_offset = msr_bitmap::byte_of(msr, write);
      if (byte_offset < 0) return ExitTarget::l1;
      // As KVM: L1's bitmap is read with a guest-memory read, not a map.
      uint8_t byte = 0;
      if (!vm_.read_guest((v.msr_bitmap & kPageMask) + static_cast<uint64_t>(byte_offset), &byte, 1)) return ExitTarget::l1;
      return (byte >> msr_bitmap::bit_of(msr)) & 1 ? ExitTarget::l1 : ExitTarget::l0;
    }
    case ExitReason::kHlt:
      return (v.primary_proc_controls & proc::kHltExiting) ? ExitTarget::l1 : ExitTarget::l0;
    case ExitReason::kExternalInterrupt:
      return (v.pin_based_controls & pin::kExternalInterruptExiting) ? ExitTarget::l1 : ExitTarget::l0;
    case ExitReason::kVmcall:
    case ExitReason::kEptViolation:
    case ExitReason::kApicAccess:
    case ExitReason::kCrAccess:
    case ExitReason::kTprBelowThreshold:
      return ExitTarget::l1;
    default:
      return ExitTarget::l0;
  }
}

void NestedVmx::reflect_exit(const ExitInfo& exit) {
  NC_CHECK(guest_mode_);
  vmcs12_.set_exit_info(exit);
  if (evmcs_in_use()) sync_vmcs12_to_evmcs();
  // Put vmcs12 pages: map unmaps them all (not the eVMCS, kept while in
  // use); the caches stay mapped.
  pages_->put();
  guest_mode_ = false;
  counters_.add(Counter::reflected_exits);
}

Status NestedVmx::access_page(L1Page p, Gpa gpa, const std::function<void(const PageView&)>& fn) {
  return pages_->access(p, gpa, fn);
}

}  // namespace nestcache::vmx
