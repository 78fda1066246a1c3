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
// them.
#include "vmx/nested.h"


namespace nestcache::vmx {

NestedStateImage NestedVmx::get_nested_state() const {
  NestedStateImage s;
  if (!vmxon_) return s;
  s.vmxon_gpa = vmxon_ptr_;
  // eVMCS: when an enlightened VMCS is current, the eVMCS work sets s.evmcs,
  // the eVMCS address, and a full copy (copy_evmcs_to_vmcs12, clean fields 0).
  if (current_ != kInvalidGpa) {
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

// The eVMCS hook. A blob with kEvmcs passes the format checks (decode), but
// restoring it needs what only the enlightened-VMCS path has: the VP-assist
// page, the eVMCS revision check, the eVMCS copy and its nested context.
// The eVMCS work replaces this with those checks and installs the eVMCS in
// set_nested_state() (the step marked "eVMCS:" there).
Status NestedVmx::check_evmcs_nested_state(const NestedStateImage& s) const {
  return errorf(EINVAL,
                "nested state: eVMCS state needs enlightened-VMCS support on this vCPU (VP-assist page, eVMCS "
                "copy), which this build does not have; eVMCS address {:#x} not restored",
                s.current_vmcs_gpa);
}

Status NestedVmx::set_nested_state(std::span<const std::byte> blob) {
  // 1. Validate. Everything that can fail fails here, before any change.
  if (blob.size() > kNestedStateMaxSize)
    return errorf(E2BIG, "nested state: blob of {} bytes exceeds the largest version-{} state ({} bytes)",
                  blob.size(), kNestedStateVersion, kNestedStateMaxSize);
  const NestedStateImage s = NC_TRY(decode(blob));
  NC_TRY(check_nested_state_addresses(s, [this](Gpa gpa, uint64_t len) { return gpa_backed(gpa, len); }));
  if (s.evmcs) NC_TRY(check_evmcs_nested_state(s));

  // 2. Leave whatever nested state the vCPU had (KVM's vmx_leave_nested):
  // the current vmcs12 is written back, its context cleared, the pages put.
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
  // eVMCS: the eVMCS work makes s.current_vmcs_gpa the current eVMCS here
  // (clear the old context, load the new one) instead of a vmcs12 pointer.
  if (s.current_vmcs_gpa != kInvalidGpa) {
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
  if (!guest_mode_) return ok();
  // eVMCS: KVM maps the eVMCS (nested_get_evmcs_page) before the vmcs12
  // pages; the eVMCS work adds that here.
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
