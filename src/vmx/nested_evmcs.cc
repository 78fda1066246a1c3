// NestedVmx's enlightened-VMCS half (DESIGN.md §4 "Enlightened VMCS"; seed
// patches 6, 7 and 9): the VP-assist MSR, the enlightened VMPTRLD every
// VMLAUNCH/VMRESUME starts with, and the copies back into the page.
//
// An enlightened entry, top to bottom (called first thing by enter()):
//   1. the VP-assist page names the eVMCS (enlightened entry on + address);
//   2. a new address: clear the old eVMCS's nested context, load the new one
//      (patch 9), so the context's eVMCS cache serves the page;
//   3. lock the page through the strategy on EVERY entry (patch 7): map keeps
//      the HostMap of step 2, cache checks or refreshes its PfnCache. A page
//      that cannot be mapped is #UD for L1;
//   4. a bad revision on a new address is VMfailInvalid;
//   5. copy the page once and take patch 6's snapshot from that copy (clean
//      fields, MSR-bitmap and flush-hypercall enlightenments); copy the dirty
//      groups into vmcs12. Nothing later in the entry reads the page again
//      except the final "mark every group clean" write.
//
// Nested state: get_nested_state copies the whole page (clean fields 0,
// evmcs_full_copy); a restore maps the eVMCS in the request before the next
// entry (get_evmcs_page, KVM's nested_get_evmcs_page), not in an entry.
#include <cstring>

#include "base/check.h"
#include "vmx/entry_checks.h"
#include "vmx/nested.h"
#include "vmx/vmx_nested_contexts.h"

namespace nestcache::vmx {

namespace {

// HV_X64_MSR_VP_ASSIST_PAGE bits 11:1 are reserved.
constexpr uint64_t kVpAssistReserved = 0xffe;

std::span<const std::byte, kPageSize> page_of(const PageView& view) {
  return std::span<const std::byte, kPageSize>(view.bytes(), kPageSize);
}

}  // namespace

bool NestedVmx::set_vp_assist_msr(uint64_t value) {
  if (!evmcs_enabled_) return false;  // no Hyper-V enlightenments for this vCPU
  if (value & kVpAssistReserved) return false;
  if ((value & kVpAssistPageEnable) && !vm_.gfn_to_hva(gpa_to_gfn(value & kPageMask))) return false;
  vp_assist_msr_ = value;
  return true;
}

std::optional<Gpa> NestedVmx::vp_assist_evmptr() const {
  if (!(vp_assist_msr_ & kVpAssistPageEnable)) return std::nullopt;
  // KVM reads the VP-assist page with a cached guest read, not a map: an
  // emulation-path copy (DESIGN.md §3).
  std::array<std::byte, kPageSize> buf{};
  if (!vm_.read_guest(vp_assist_msr_ & kPageMask, buf.data(), sizeof(VpAssistPage))) return std::nullopt;
  std::optional<Gpa> evmptr = VpAssistPage::load(buf).current_evmcs();
  // evmptr_is_valid: an address that cannot name a page is "no eVMCS".
  if (!evmptr || *evmptr == kInvalidGpa || !page_address_valid(*evmptr)) return std::nullopt;
  return evmptr;
}

NestedVmx::Evmptrld NestedVmx::handle_enlightened_vmptrld(bool launch, std::string& why) {
  if (!evmcs_enabled_) return Evmptrld::disabled;
  // A restored eVMCS is mapped by kGetNestedStatePages, and enter_guest_mode()
  // lets no L1 instruction run while that request is pending.
  NC_DCHECK(!evmcs_map_pending_);
  std::optional<Gpa> gpa = vp_assist_evmptr();
  if (!gpa) {
    release_evmcs();
    return Evmptrld::disabled;
  }

  bool changed = false;
  if (*gpa != evmcs_gpa_) {
    // Another eVMCS (or the first): the old one and any VMPTRLD'd vmcs12 stop
    // being current, and the new address's context serves its caches. The
    // vmcs12 is dropped without a write-back, as KVM only forgets
    // current_vmptr here.
    release_evmcs();
    if (current_ != kInvalidGpa) {
      release_context(current_);
      current_ = kInvalidGpa;
    }
    load_context(*gpa);
    evmcs_gpa_ = *gpa;
    changed = true;
  }

  // One copy of the page, under the strategy's lock. On a launch or a new
  // address nothing L0 derived from an earlier entry may be trusted: the
  // clean bits are cleared in the page too, as KVM does.
  const bool force_dirty = launch || changed;
  EvmcsPage page;
  Status locked = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
    page = EvmcsPage::load(page_of(view));
    if (force_dirty) view.write<uint32_t>(kEvmcsCleanFieldsOffset, page.clean_fields & ~evmcs_clean::kAll);
  });
  if (!locked) {
    counters_.add(Counter::evmcs_map_failures);
    why = fmt::format("the enlightened VMCS at {:#x} cannot be mapped: {}", *gpa, locked.error().message);
    release_evmcs();
    // An address with no backing is L1's mistake (#UD, as KVM); a resource
    // L0 could not get is the VMM's to hear about, with its errno.
    if (locked.error().code != EFAULT) {
      evmcs_host_error_ = Error{locked.error().code, why};
      return Evmptrld::host_error;
    }
    return Evmptrld::error;
  }
  if (changed) {
    if (auto st = check_evmcs_revision(page); !st) {
      why = st.error().to_string();
      release_evmcs();
      return Evmptrld::vmfail;
    }
    // A VMLAUNCH on a new eVMCS starts from an empty vmcs12 (KVM zeroes it).
    if (launch) {
      vmcs12_ = Vmcs12{};
      vmcs12_.revision_id = kVmcs12Revision;
    }
  }
  if (force_dirty) force_msr_bitmap_recalc_ = true;

  // Patch 6: the three values every later decision of this entry uses.
  evmcs_snap_ = EvmcsSnapshot::take(page, force_dirty);
  copy_evmcs_to_vmcs12(page, vmcs12_, evmcs_snap_.clean_fields);
  // An eVMCS has no launch state of its own: the instruction decides it.
  vmcs12_.launch_state = launch ? kLaunchStateClear : kLaunchStateLaunched;
  if (evmcs_snapshot_hook_) evmcs_snapshot_hook_();  // tests only
  return Evmptrld::succeeded;
}

void NestedVmx::release_evmcs() {
  if (evmcs_gpa_ == kInvalidGpa) return;
  Gpa old = evmcs_gpa_;
  evmcs_gpa_ = kInvalidGpa;
  evmcs_map_pending_ = false;
  evmcs_snap_ = {};
  force_msr_bitmap_recalc_ = true;
  pages_->release_evmcs();
  // Detached, its eVMCS cache stays mapped in the table for the next load.
  release_context(old);
}

Status NestedVmx::get_evmcs_page() {
  // 1. The VP-assist page must name the restored eVMCS. KVM finds the eVMCS
  // there and takes whatever it names; the blob carries the address, the
  // nested context and the L2 are keyed by it, so a VMM that restored
  // another VP-assist page (or none yet) gets a clean failure instead of an
  // L2 running on some other eVMCS.
  std::optional<Gpa> named = vp_assist_evmptr();
  if (!named)
    return errorf(EINVAL, "the VP-assist page (MSR value {:#x}) names no eVMCS; the restored eVMCS is {:#x}",
                  vp_assist_msr_, evmcs_gpa_);
  if (*named != evmcs_gpa_)
    return errorf(EINVAL, "the VP-assist page names eVMCS {:#x}, not the restored eVMCS {:#x}", *named, evmcs_gpa_);

  // 2. Lock the page through the strategy, as every enlightened VMPTRLD
  // does (patch 7): map takes its HostMap, cache/oracle activate the eVMCS
  // cache of the context set_nested_state loaded. The address is new to
  // this vCPU, so once the revision is right every clean bit is cleared in
  // the page too: L1's next VMRESUME copies every group.
  EvmcsPage page;
  VmxStatus revision;
  Status locked = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
    page = EvmcsPage::load(page_of(view));
    revision = check_evmcs_revision(page);
    if (revision) view.write<uint32_t>(kEvmcsCleanFieldsOffset, page.clean_fields & ~evmcs_clean::kAll);
  });
  if (!locked) {
    counters_.add(Counter::evmcs_map_failures);
    return errorf(EFAULT, "the enlightened VMCS at {:#x} cannot be mapped: {}", evmcs_gpa_, locked.error().message);
  }
  if (!revision) return errorf(EINVAL, "the enlightened VMCS at {:#x}: {}", evmcs_gpa_, revision.error().to_string());

  // 3. Patch 6's snapshot with every group dirty; no copy into vmcs12 (the
  // seed's copy=false): the blob's vmcs12 is newer than anything in the
  // page. KVM then writes it into the page (need_vmcs12_to_shadow_sync).
  evmcs_map_pending_ = false;
  evmcs_snap_ = EvmcsSnapshot::take(page, /*force_dirty=*/true);
  force_msr_bitmap_recalc_ = true;
  sync_vmcs12_to_evmcs();
  return ok();
}

Vmcs12 NestedVmx::evmcs_full_copy() {
  Vmcs12 v = vmcs12_;
  // Clean fields 0: the bits describe what changed since this vCPU's last
  // entry, which a restored vCPU never had (KVM commit d6bf71a18c74).
  Status st = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
    copy_evmcs_to_vmcs12(EvmcsPage::load(page_of(view)), v, evmcs_clean::kNone);
  });
  if (!st) counters_.add(Counter::evmcs_map_failures);
  return v;
}

void NestedVmx::sync_vmcs12_to_evmcs() {
  Status st = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
    std::byte* bytes = view.mutable_bytes();
    std::span<std::byte, kPageSize> span(bytes, kPageSize);
    EvmcsPage page = EvmcsPage::load(span);
    copy_vmcs12_to_evmcs(vmcs12_, page);
    page.store(span);
  });
  // The seed's copy does not check; here L1 keeps the page as it was and
  // the lost write-back is counted.
  if (!st) counters_.add(Counter::evmcs_map_failures);
}

void NestedVmx::mark_evmcs_clean() {
  Status st = pages_->lock_evmcs(evmcs_gpa_, [&](const PageView& view) {
    uint32_t clean = view.read<uint32_t>(kEvmcsCleanFieldsOffset);
    view.write<uint32_t>(kEvmcsCleanFieldsOffset, clean | evmcs_clean::kAll);
  });
  if (!st) counters_.add(Counter::evmcs_map_failures);
}

}  // namespace nestcache::vmx
