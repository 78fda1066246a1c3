// Nested state on the vCPU: KVM_GET_NESTED_STATE / KVM_SET_NESTED_STATE and
// the request that resolves the vmcs12 pages after a restore
// (docs/nested-state.md; the blob format is nested_state_format.h).
//
// A restore is two steps, as in KVM:
//   set_nested_state()        validate everything, then install the state;
//                             in guest mode request kGetNestedStatePages
//   get_nested_state_pages()  before the next entry, on the vCPU thread:
//                             get the vmcs12 pages through the strategy and
//                             build vmcs02 (KVM's fallbacks; an APIC-access
//                             page that cannot be had fails that entry)
// The pages are deliberately not looked at by set: the VMM restores L1's
// memory and memslots in any order around the set, and only the entry needs
// them. The same holds for a restored eVMCS: set makes it the eVMCS in use
// (its nested context loaded), the request maps it (get_evmcs_page).
#include "vmx/nested.h"


namespace nestcache::vmx {

NestedStateImage NestedVmx::get_nested_state() {
  NestedStateImage s;
  if (!vmxon_) return s;
  s.vmxon_gpa = vmxon_ptr_;
  if (evmcs_in_use()) {
    // The eVMCS address stands for the current VMCS. KVM copies the page
    // only outside guest mode: in guest mode the cached vmcs12 is what L2
    // runs on (the entry's copy; the page may have changed since, patch 6).
    s.evmcs = true;
    s.current_vmcs_gpa = evmcs_gpa_;
    s.vmcs12 = guest_mode_ || evmcs_map_pending_ ? vmcs12_ : evmcs_full_copy();
  } else if (current_ != kInvalidGpa) {
    s.current_vmcs_gpa = current_;
    s.vmcs12 = vmcs12_;  // L0's cached copy: newer than the region in L1 memory
  }
  s.guest_mode = guest_mode_;
  s.run_pending = run_pending();
  return s;
}

bool NestedVmx::gpa_backed(Gpa gpa, uint64_t len) const {
  if (len == 0) return true;
  for (Gfn g = gpa_to_gfn(gpa); g <= gpa_to_gfn(gpa + len - 1); g++)
    if (!vm_.gfn_to_hva(g)) return false;
  return true;
}

// What a blob with kEvmcs needs beyond the format (decode: alignment,
// width, flag combinations, eVMCS controls) and the memslots
// (check_nested_state_addresses): a vCPU that enabled the enlightened VMCS,
// as KVM's vmx_set_nested_state requires enlightened_vmcs_enabled. The
// eVMCS page itself (revision, the VP-assist page naming it) is looked at by
// the request before the next entry, like every page the state names.
Status NestedVmx::check_evmcs_nested_state(const NestedStateImage& s) const {
  if (!evmcs_enabled_)
    return errorf(EINVAL,
                  "nested state: eVMCS flag is set but vCPU {} has not enabled the enlightened VMCS "
                  "(KVM_CAP_HYPERV_ENLIGHTENED_VMCS); eVMCS {:#x} not restored",
                  vcpu_.id(), s.current_vmcs_gpa);
  return ok();
}

Status NestedVmx::set_nested_state(std::span<const std::byte> blob) {
  // 1. Validate. Everything that can fail fails here, before any change.
  if (blob.size() > kNestedStateMaxSize)
    return errorf(E2BIG, "nested state: blob of {} bytes exceeds the largest version-{} state ({} bytes)",
                  blob.size(), kNestedStateVersion, kNestedStateMaxSize);
  // The entry checks of a guest-mode vmcs12 as on this vCPU: its eVMCS
  // filter, and L1 memory for a VMCS link pointer.
  const NestedStateImage s = NC_TRY(decode(blob, entry_check_env()));
  NC_TRY(check_nested_state_addresses(s, [this](Gpa gpa, uint64_t len) { return gpa_backed(gpa, len); }));
  if (s.evmcs) NC_TRY(check_evmcs_nested_state(s));

  // 2. Leave whatever nested state the vCPU had (KVM's vmx_leave_nested):
  // the cached vmcs12 is dropped (never written to L1 memory, which the VMM
  // may have restored already), its context cleared, the pages put.
  release_nested();
  vmxon_ = false;
  vmxon_ptr_ = kInvalidGpa;
  run_pending_ = false;
  const uint64_t generation = vmcs02_.generation;
  vmcs02_ = Vmcs02{};
  vmcs02_.generation = generation + 1;  // vmcs02 holds no pfn of the old state
  if (!s.vmx_on()) return ok();

  // 3. Install. From here nothing fails.
  vmxon_ = true;
  vmxon_ptr_ = s.vmxon_gpa;
  if (s.evmcs) {
    // The blob's eVMCS is the one in use, but not mapped on this vCPU yet
    // (KVM's EVMPTR_MAP_PENDING); its context, keyed by the eVMCS address,
    // serves the caches from now on, as an address change does (patch 9).
    // The request maps it before the next entry, in guest mode or not.
    evmcs_gpa_ = s.current_vmcs_gpa;
    evmcs_map_pending_ = true;
    vmcs12_ = *s.vmcs12;  // the blob carries no clean bit: none of the source's is trusted
    load_context(evmcs_gpa_);
    vcpu_.make_request(vm::Request::kGetNestedStatePages);
  } else if (s.current_vmcs_gpa != kInvalidGpa) {
    current_ = s.current_vmcs_gpa;
    vmcs12_ = *s.vmcs12;  // the blob's copy, not the region in L1 memory
    load_context(current_);  // as VMPTRLD (set_current_vmptr) does
  }
  if (s.guest_mode) {
    // In VMX non-root operation from now on, but vmcs02 has no pages yet:
    // the request resolves them before the next entry (process_requests
    // runs before every entry, and enter_guest_mode() refuses an entry
    // while a request is pending).
    guest_mode_ = true;
    run_pending_ = s.run_pending;
    vcpu_.make_request(vm::Request::kGetNestedStatePages);
  }
  return ok();
}

Status NestedVmx::get_nested_state_pages() {
  // KVM maps the eVMCS (nested_get_evmcs_page) before the vmcs12 pages, and
  // fails the entry when it cannot.
  if (evmcs_map_pending_) {
    if (auto st = get_evmcs_page(); !st)
      return errorf(st.error().code, "nested state restored, but its enlightened VMCS cannot be used: {}",
                    st.error().message);
  }
  if (!guest_mode_) return ok();
  if (auto st = get_vmcs12_pages(); !st)
    return errorf(st.error().code, "nested state restored, but the entry into L2 cannot be built: {}",
                  st.error().message);
  // KVM's invalid-address fallback for the virtual-APIC page: the hardware
  // entry into L2 would fail on this vmcs02.
  if (vmcs02_.vapic_bad_address)
    return errorf(EFAULT, "nested state restored, but virtual-APIC page {:#x} has no backing",
                  vmcs12_.virtual_apic_page_addr);
  return ok();
}

}  // namespace nestcache::vmx
