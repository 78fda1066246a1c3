// The nested VM entry, top to bottom (DESIGN.md §4): L1's VMLAUNCH or
// VMRESUME is checked like the instruction (VMX operation, a current VMCS,
// launch state), then
//   1. the consistency checks on vmcs12's controls and host state (VMfail);
//   2. get vmcs12 pages: each L1 page the entry needs, through the VM's page
//      strategy, with KVM's fallback when L1 named an address with no
//      backing; a host resource L0 could not get (a remap window, a frame)
//      is an internal error instead, naming its errno;
//   3. vmcs02: the controls, the pfns of those pages, L1's MSR bitmap merged;
//      the checks that need those pages (TPR threshold against VTPR) and
//      the guest-state checks (an entry failure), in KVM's order; the vCPU
//      switches to guest mode;
//   4. on every hardware entry into L2 afterwards, the last check with the
//      vCPU already in guest mode (seed patch 3): an invalidated page cancels
//      the entry, and kRefreshGuestPages rewrites vmcs02 before the next one.
#include "vmx/nested.h"

#include <cstring>

namespace nestcache::vmx {

namespace {

// KVM's fallbacks are for an address L1 gave that leads nowhere (EFAULT:
// no memslot, no region). When L0 itself runs out of something (ENOMEM for
// a remap window, a munmap that keeps failing, no free frame), a fallback
// would hide that from the VMM behind a guest-visible VMfail or lost
// feature; the entry ends as an internal error with the host's errno.
bool host_resource_failure(const Error& e) { return e.code != EFAULT; }

}  // namespace

EntryResult NestedVmx::enter(bool launch) {
  const char* insn = launch ? "VMLAUNCH" : "VMRESUME";
  if (!vmxon_) return EntryResult::failed(OpResult::undefined(fmt::format("{} outside VMX operation", insn)));
  // 0. The enlightened VMPTRLD (patches 6-7): with an eVMCS in use, vmcs12
  // now holds its dirty groups and the snapshot decides the rest.
  std::string why;
  switch (handle_enlightened_vmptrld(launch, why)) {
    case Evmptrld::error:
      return EntryResult::failed(OpResult::undefined(fmt::format("{}: {}", insn, why)));
    case Evmptrld::host_error:
      return EntryResult::internal_error(evmcs_host_error_);
    case Evmptrld::vmfail:
      return EntryResult::failed(OpResult::fail_invalid(fmt::format("{}: {}", insn, why)));
    case Evmptrld::disabled:
    case Evmptrld::succeeded:
      break;
  }
  if (current_ == kInvalidGpa && !evmcs_in_use())
    return EntryResult::failed(OpResult::fail_invalid(fmt::format("{} without a current VMCS", insn)));
  // KVM compares the launch-state word with the instruction: VMLAUNCH
  // needs it not launched (1), VMRESUME not clear (0).
  if (launch && vmcs12_.launch_state == kLaunchStateLaunched)
    return EntryResult::failed(fail_valid(VmInstructionError::kVmlaunchNonClearVmcs, "VMLAUNCH of a launched VMCS"));
  if (!launch && vmcs12_.launch_state == kLaunchStateClear)
    return EntryResult::failed(fail_valid(VmInstructionError::kVmresumeNonLaunchedVmcs, "VMRESUME of a VMCS that was never launched"));

  // 1. Consistency checks on controls (with the eVMCS filter when the vCPU
  // has the enlightened VMCS enabled) and host state: VMfailValid.
  const EntryCheckEnv env = entry_check_env();
  VmxStatus checked = check_entry_controls(vmcs12_, env);
  if (checked) checked = check_entry_host_state(vmcs12_, env);
  if (!checked) return EntryResult::failed(fail(checked.error()));

  // 2-3. Get vmcs12 pages through the strategy, build vmcs02.
  if (auto st = get_vmcs12_pages(); !st) {
    pages_->put();
    return EntryResult::internal_error(st.error());
  }
  // The guest state is checked in software; what needs the pages is left to
  // the hardware entry after it, as stock KVM leaves it (its
  // nested_vmx_check_controls_late checks the vTPR and the virtual-APIC page
  // only with the warn_on_missed_cc parameter, off by default): a bad guest
  // state is an entry failure first. A failure puts the pages.
  if (VmxStatus guest = check_entry_guest_state(vmcs12_, env); !guest) {
    pages_->put();
    ExitInfo e = ExitInfo::of(guest.error().exit_reason, guest.error().qualification);
    e.exit_reason |= kExitReasonEntryFailure;
    vmcs12_.set_exit_info(e);
    if (evmcs_in_use()) sync_vmcs12_to_evmcs();
    return EntryResult::exit_to_l1(guest.error().to_string());
  }
  // The hardware entry: KVM writes an invalid virtual-APIC address into
  // vmcs02 when it could not map the page (and the TPR shadow stays on), and
  // the processor checks the TPR threshold against the vTPR (SDM 26.2.1.1);
  // either fails the entry, which L1 sees as VMfailValid(7).
  if (vmcs02_.vapic_bad_address) {
    pages_->put();
    return EntryResult::failed(fail_valid(VmInstructionError::kEntryInvalidControlFields, "virtual-APIC page has no backing"));
  }
  if (VmxStatus late = check_vtpr(); !late) {
    pages_->put();
    return EntryResult::failed(fail(late.error()));
  }
  guest_mode_ = true;
  if (launch) vmcs12_.launch_state = kLaunchStateLaunched;
  if (evmcs_in_use()) mark_evmcs_clean();
  counters_.add(Counter::nested_entries);
  run_pending_ = true;  // until L2 is on the hardware: see check_before_hardware_entry()
  return EntryResult::entered();
}

EntryCheckEnv NestedVmx::entry_check_env(bool run_pending) const {
  EntryCheckEnv env;
  env.evmcs_enabled = evmcs_enabled_;
  env.run_pending = run_pending;
  env.read_guest32 = [this](Gpa gpa) -> std::optional<uint32_t> {
    uint32_t x = 0;
    if (!vm_.read_guest(gpa, &x, sizeof x)) return std::nullopt;
    return x;
  };
  return env;
}

VmxStatus NestedVmx::check_vtpr() {
  if (!vmcs02_.vapic.valid()) return {};  // no TPR shadow in use
  uint8_t vtpr = 0;
  // Through the strategy's hold on the page vmcs02 uses (map keeps it
  // mapped until the exit, the caches are active): no extra mapping.
  Status st = pages_->access(L1Page::vapic, vmcs12_.virtual_apic_page_addr,
                             [&](const PageView& view) { vtpr = view.read<uint8_t>(kApicTprOffset); });
  if (!st) return {};  // unreadable now: the hardware entry decides
  return check_entry_controls_late(vmcs12_, vtpr);
}

Status NestedVmx::get_vmcs12_pages() {
  // A context another vCPU took (or detached) is no longer this vCPU's: its
  // caches may be bound to that vCPU now. Back to the vCPU's own set.
  if (context_lost()) use_own_pages();
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
    if (!hw) return errorf(hw.error().code, "no backing for APIC-access address {:#x}: {}", v.apic_access_addr, hw.error().message);
    o.apic_access = *hw;
  }
  if (o.proc & proc::kUseTprShadow) {
    auto hw = pages_->get_hw(L1Page::vapic, v.virtual_apic_page_addr);
    if (hw) {
      o.vapic = *hw;
    } else if (host_resource_failure(hw.error())) {
      return errorf(hw.error().code, "virtual-APIC page at {:#x}: {}", v.virtual_apic_page_addr, hw.error().message);
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
    else if (host_resource_failure(hw.error()))
      return errorf(hw.error().code, "posted-interrupt descriptor at {:#x}: {}", v.posted_intr_desc_addr,
                    hw.error().message);
    else
      o.pin &= ~pin::kPostedInterrupts;  // the internal error waits until L0 needs the descriptor
  }
  NC_TRY(merge_msr_bitmap(o));
  o.generation++;
  vmcs02_ = o;
  return ok();
}

Status NestedVmx::merge_msr_bitmap(Vmcs02& o) {
  if (!(vmcs12_.primary_proc_controls & proc::kUseMsrBitmaps)) {
    o.use_msr_bitmap = false;
    return ok();
  }
  // eVMCS: L1 promised (MSR-bitmap enlightenment) to clear the MSR_BITMAP
  // clean bit whenever it changes its bitmap; clean in this entry's
  // snapshot, the merged bitmap L0 already has still holds.
  if (evmcs_in_use() && !force_msr_bitmap_recalc_ && evmcs_snap_.msr_bitmap_unchanged()) {
    o.use_msr_bitmap = true;
    return ok();
  }
  // L0 intercepts nothing of its own, so the merge is L1's bitmap as is.
  Status st = pages_->access(L1Page::msr_bitmap, vmcs12_.msr_bitmap & kPageMask, [&](const PageView& view) {
    std::memcpy(o.msr_bitmap.data(), view.bytes(), kPageSize);
  });
  if (!st && host_resource_failure(st.error()))
    return errorf(st.error().code, "MSR bitmap at {:#x}: {}", vmcs12_.msr_bitmap, st.error().message);
  // KVM's fallback: an unusable bitmap means vmcs02 uses none (all MSRs exit).
  o.use_msr_bitmap = static_cast<bool>(st);
  if (st) force_msr_bitmap_recalc_ = false;
  return ok();
}

bool NestedVmx::last_check_fails() const { return guest_mode_ && (context_lost() || pages_->any_invalid()); }

bool NestedVmx::check_before_hardware_entry() {
  if (!guest_mode_) return true;
  // The vCPU is already in guest mode: an invalidation that marks a cache
  // after this check kicks the vCPU out (the notifier waits for it), and one
  // that marked it before is seen here. Either way L2 never runs on a pfn
  // that no longer backs its page.
  if (last_check_fails()) {
    vcpu_.make_request(vm::Request::kRefreshGuestPages);
    counters_.add(Counter::entry_cancels);
    return false;
  }
  run_pending_ = false;  // L2 is on the hardware now
  return true;
}

Status NestedVmx::refresh_guest_pages() {
  if (!guest_mode_) return ok();
  NC_TRY(get_vmcs12_pages());
  // KVM's invalid-address fallback for the virtual-APIC page makes the
  // hardware entry fail; L2 cannot run on this vmcs02.
  if (vmcs02_.vapic_bad_address) return errorf(EFAULT, "virtual-APIC page {:#x} has no backing", vmcs12_.virtual_apic_page_addr);
  return ok();
}

}  // namespace nestcache::vmx
