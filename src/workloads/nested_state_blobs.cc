// Malformed nested-state blobs for the `nested-state` selftest: one per rule
// a restore checks (docs/nested-state.md "Validation").
#include <cstring>

#include "vmx/nested_state_format.h"
#include "workloads/nested_state_migration.h"

namespace nestcache::workloads::nested_state {

namespace {

namespace off = vmx::nested_state_offset;
using Blob = std::vector<std::byte>;

// An address aligned and within the physical-address width, but in no
// memslot of a VM made by make_vm.
constexpr Gpa kUnbacked = 0x40000000;

template <class T>
Blob poke(Blob b, size_t at, T value) {
  std::memcpy(b.data() + at, &value, sizeof value);
  return b;
}

}  // namespace

std::vector<BadBlob> malformed_blobs(std::span<const std::byte> good_span) {
  const Blob good(good_span.begin(), good_span.end());
  auto decoded = vmx::decode(good);
  if (!decoded || !decoded->guest_mode || !decoded->vmcs12) return {};
  const vmx::NestedStateImage g = *decoded;
  // A variant of the good state, encoded.
  auto with = [&](auto edit) {
    vmx::NestedStateImage s = g;
    edit(s);
    return vmx::encode(s);
  };
  auto vmcs12_with = [&](auto edit) { return with([&](vmx::NestedStateImage& s) { edit(*s.vmcs12); }); };
  using S = vmx::NestedStateImage;
  using V = vmx::Vmcs12;
  // The current-VMCS rules name what the address is: a vmcs12, or an eVMCS.
  const bool ev = g.evmcs;
  const std::string current = ev ? "eVMCS address" : "current vmcs12 address";
  const std::string cur = ev ? "evmcs" : "vmcs12";

  std::vector<BadBlob> v;
  // --- framing ---
  v.push_back({"truncated-header", Blob(good.begin(), good.begin() + 40), EINVAL, "shorter than the 64-byte header"});
  v.push_back({"truncated-image", Blob(good.begin(), good.begin() + 2000), EINVAL, "truncated"});
  {
    // On a header-only blob: a full one with bytes after it is over the
    // size limit, which a restore checks first (E2BIG, below).
    Blob b = with([](vmx::NestedStateImage& s) {
      s.guest_mode = false;
      s.run_pending = false;
      s.current_vmcs_gpa = kInvalidGpa;
      s.vmcs12.reset();
    });
    b.resize(b.size() + 16);
    v.push_back({"trailing-bytes", b, EINVAL, "16 trailing bytes"});
  }
  v.push_back({"oversized", Blob(64 << 10), E2BIG, "exceeds the largest version-1 state"});
  v.push_back({"bad-magic", poke<uint32_t>(good, off::kMagic, 0x4d565a4b), EINVAL, "bad magic"});
  v.push_back({"wrong-version", poke<uint16_t>(good, off::kVersion, 2), EINVAL, "version 2 is not supported"});
  v.push_back({"wrong-header-size", poke<uint16_t>(good, off::kHeaderSize, 128), EINVAL, "header size 128"});
  v.push_back({"odd-image-size", poke<uint32_t>(good, off::kVmcs12Size, 100), EINVAL, "neither 0 nor 4096"});
  v.push_back({"image-size-disagrees", poke<uint32_t>(good, off::kVmcs12Size, 0), EINVAL, "does not equal the header"});
  v.push_back({"reserved-byte", poke<uint8_t>(good, off::kReserved + 3, 0xff), EINVAL, "reserved header byte"});
  v.push_back({"unknown-flag", poke<uint32_t>(good, off::kFlags, g.flags() | (1u << 7)), EINVAL, "unknown flag bits"});
  // --- flags and addresses ---
  v.push_back({"run-pending-without-guest-mode", with([](S& s) { s.guest_mode = false; s.run_pending = true; }),
               EINVAL, "run-pending flag without guest mode"});
  v.push_back({"guest-mode-without-vmxon", with([](S& s) { s.vmxon_gpa = kInvalidGpa; }), EINVAL,
               "guest-mode flag is set but VMX is off"});
  // Without the eVMCS flag, whose own VMX-off case is evmcs-without-vmxon.
  v.push_back({"vmcs12-without-vmxon",
               with([](S& s) { s.vmxon_gpa = kInvalidGpa; s.guest_mode = false; s.evmcs = false; }), EINVAL,
               "given but VMX is off"});
  v.push_back({"misaligned-vmxon", with([](S& s) { s.vmxon_gpa += 0x10; }), EINVAL,
               "VMXON address " + fmt::format("{:#x}", g.vmxon_gpa + 0x10) + " is not 4 KiB aligned"});
  v.push_back({"vmxon-beyond-width", with([](S& s) { s.vmxon_gpa = uint64_t{1} << 47; }), EINVAL,
               "physical-address width"});
  v.push_back({"misaligned-" + cur, with([](S& s) { s.current_vmcs_gpa += 0x8; }), EINVAL,
               current + fmt::format(" {:#x}", g.current_vmcs_gpa + 0x8) + " is not 4 KiB aligned"});
  v.push_back({cur + "-beyond-width", with([](S& s) { s.current_vmcs_gpa = uint64_t{1} << 46; }), EINVAL,
               current + " 0x400000000000 exceeds the 46-bit physical-address width"});
  v.push_back({cur + "-is-vmxon", with([&](S& s) { s.current_vmcs_gpa = g.vmxon_gpa; }), EINVAL,
               current + fmt::format(" {:#x} is the VMXON region", g.vmxon_gpa)});
  // Without the eVMCS flag, whose own rule is evmcs-without-address.
  v.push_back({"guest-mode-without-vmcs12",
               with([](S& s) { s.current_vmcs_gpa = kInvalidGpa; s.vmcs12.reset(); s.evmcs = false; }), EINVAL,
               "guest-mode flag is set but there is no current vmcs12"});
  v.push_back({"vmcs12-address-without-image", with([](S& s) { s.guest_mode = false; s.vmcs12.reset(); }), EINVAL,
               "given without a vmcs12 image"});
  // --- the vmcs12 image ---
  v.push_back({"shadow-vmcs-indicator", vmcs12_with([](V& x) { x.revision_id |= vmx::kVmcsShadowIndicator; }), EINVAL,
               "shadow-VMCS indicator"});
  v.push_back({"wrong-revision", vmcs12_with([](V& x) { x.revision_id = 0x1234; }), EINVAL, "revision 0x1234"});
  v.push_back({"bad-launch-state", vmcs12_with([](V& x) { x.launch_state = 7; }), EINVAL, "launch state 7"});
  if (ev)  // no posted interrupts with an eVMCS: break the MSR-bitmap address instead
    v.push_back({"entry-check-controls", vmcs12_with([](V& x) { x.msr_bitmap += 4; }), EINVAL,
                 "fails msr-bitmap-address"});
  else
    v.push_back({"entry-check-controls", vmcs12_with([](V& x) { x.posted_intr_desc_addr += 4; }), EINVAL,
                 "fails posted-interrupt-descriptor"});
  v.push_back({"entry-check-host-state", vmcs12_with([](V& x) { x.host_cr4 = 0; }), EINVAL, "fails host-cr4-fixed"});
  v.push_back({"entry-check-guest-state", vmcs12_with([](V& x) { x.vmcs_link_pointer = 0; }), EINVAL,
               "fails vmcs-link-pointer"});
  // --- the VM: addresses with no memslot ---
  v.push_back({"vmxon-without-memslot", with([](S& s) { s.vmxon_gpa = kUnbacked; }), EINVAL,
               "VMXON region 0x40000000 is not backed by a memslot"});
  v.push_back({cur + "-without-memslot", with([](S& s) { s.current_vmcs_gpa = kUnbacked + kPageSize; }), EINVAL,
               std::string(ev ? "eVMCS page" : "current vmcs12 region") + " 0x40001000 is not backed by a memslot"});
  // --- eVMCS ---
  v.push_back({"evmcs-without-address",
               with([](S& s) { s.evmcs = true; s.guest_mode = false; s.current_vmcs_gpa = kInvalidGpa; s.vmcs12.reset(); }),
               EINVAL, "eVMCS flag is set but no eVMCS address"});
  if (ev) {
    // PAUSE-loop exiting: a control the model supports, so the vmcs12 passes
    // the entry checks, but one eVMCS v1 cannot express.
    v.push_back({"evmcs-unsupported-controls",
                 vmcs12_with([](V& x) { x.secondary_proc_controls |= vmx::proc2::kPauseLoopExiting; }), EINVAL,
                 "fails evmcs-unsupported-control: secondary controls"});
    // VMX off with the flag alone is accepted (as KVM does); with the
    // eVMCS address it is not.
    v.push_back({"evmcs-without-vmxon",
                 with([](S& s) { s.vmxon_gpa = kInvalidGpa; s.guest_mode = false; s.vmcs12.reset(); }),
                 EINVAL, fmt::format("eVMCS address {:#x} given but VMX is off", g.current_vmcs_gpa)});
    v.push_back({"evmcs-on-vcpu-without-evmcs", good, EINVAL,
                 fmt::format("eVMCS flag is set but vCPU 0 has not enabled the enlightened VMCS "
                             "(KVM_CAP_HYPERV_ENLIGHTENED_VMCS); eVMCS {:#x} not restored", g.current_vmcs_gpa),
                 /*needs_plain_vcpu=*/true});
  } else {
    v.push_back({"evmcs-unsupported-controls", with([](S& s) { s.evmcs = true; }), EINVAL,
                 "fails evmcs-unsupported-control"});
    // Every vCPU of this variant is plain: the flag alone is refused.
    v.push_back({"evmcs-on-vcpu-without-evmcs", with([](S& s) { s.evmcs = true; s.guest_mode = false; }), EINVAL,
                 "eVMCS flag is set but vCPU 0 has not enabled the enlightened VMCS"});
  }
  return v;
}

}  // namespace nestcache::workloads::nested_state
