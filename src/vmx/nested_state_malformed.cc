// The malformed nested-state blobs (see nested_state_malformed.h).
#include "vmx/nested_state_malformed.h"

#include <cstring>

#include <fmt/format.h>

#include "vmx/nested_state_format.h"

namespace nestcache::vmx {

namespace {

namespace off = nested_state_offset;
using Blob = std::vector<std::byte>;
using S = NestedStateImage;

// The variants of one good state, and the words its messages use.
class Catalogue {
 public:
  Catalogue(Blob good, const S& g, Gpa unbacked)
      : good_(std::move(good)),
        g_(g),
        unbacked_(unbacked),
        current_(g.evmcs ? "eVMCS address" : "current vmcs12 address"),
        cur_(g.evmcs ? "evmcs" : "vmcs12") {}

  std::vector<MalformedBlob> all() {
    framing();
    flags_and_addresses();
    vmcs12_image();
    vm_and_vcpu();
    return std::move(out_);
  }

 private:
  void add(std::string name, Blob blob, std::string expect, int code = EINVAL,
           RefusedBy by = RefusedBy::format) {
    out_.push_back({std::move(name), std::move(blob), code, std::move(expect), by});
  }
  template <class T>
  Blob poke(size_t at, T value) const {
    Blob b = good_;
    std::memcpy(b.data() + at, &value, sizeof value);
    return b;
  }
  // The good state changed by `edit`, encoded.
  template <class Edit>
  Blob with(Edit edit) const {
    S s = g_;
    edit(s);
    return encode(s);
  }
  template <class Edit>
  Blob vmcs12_with(Edit edit) const {
    return with([&](S& s) { edit(*s.vmcs12); });
  }
  // Out of guest mode: no entry pending either.
  static void leave_guest_mode(S& s) {
    s.guest_mode = false;
    s.run_pending = false;
  }
  static void vmx_off(S& s) {
    leave_guest_mode(s);
    s.vmxon_gpa = kInvalidGpa;
    s.evmcs = false;
  }

  void framing();
  void flags_and_addresses();
  void vmcs12_image();
  void vm_and_vcpu();

  const Blob good_;
  const S g_;
  const Gpa unbacked_;
  const std::string current_;  // what the current-VMCS rules call the address
  const std::string cur_;      // ... in names
  std::vector<MalformedBlob> out_;
};

void Catalogue::framing() {
  add("truncated-header", Blob(good_.begin(), good_.begin() + 40), "shorter than the 64-byte header");
  add("truncated-image", Blob(good_.begin(), good_.begin() + 2000), "truncated");
  // On a header-only blob: a full one with bytes after it is over the size
  // limit, which a restore checks first (oversized, below).
  Blob trailing = with([](S& s) {
    leave_guest_mode(s);
    s.current_vmcs_gpa = kInvalidGpa;
    s.vmcs12.reset();
  });
  trailing.resize(trailing.size() + 16);
  add("trailing-bytes", trailing, "16 trailing bytes");
  add("oversized", Blob(64 << 10), "exceeds the largest version-1 state", E2BIG, RefusedBy::restore);
  add("bad-magic", poke<uint32_t>(off::kMagic, 0x4d565a4b), "bad magic");
  add("wrong-version", poke<uint16_t>(off::kVersion, 2), "version 2 is not supported");
  add("wrong-header-size", poke<uint16_t>(off::kHeaderSize, 128), "header size 128");
  add("odd-image-size", poke<uint32_t>(off::kVmcs12Size, 100), "neither 0 nor 4096");
  add("image-size-disagrees", poke<uint32_t>(off::kVmcs12Size, 0), "does not equal the header");
  add("reserved-byte", poke<uint8_t>(off::kReserved + 3, 0xff),
      fmt::format("reserved header byte at offset {}", off::kReserved + 3));
  add("unknown-flag", poke<uint32_t>(off::kFlags, g_.flags() | (1u << 7)), "unknown flag bits 0x80");
}

void Catalogue::flags_and_addresses() {
  add("run-pending-without-guest-mode", with([](S& s) {
        s.guest_mode = false;
        s.run_pending = true;
      }),
      "run-pending flag without guest mode");
  add("guest-mode-without-vmxon", with([](S& s) { s.vmxon_gpa = kInvalidGpa; }),
      "guest-mode flag is set but VMX is off");
  if (g_.evmcs) {
    // A vCPU with the enlightened VMCS accepts the flag with VMX off (as
    // KVM does), but not with an eVMCS address.
    add("evmcs-without-vmxon", with([](S& s) {
          leave_guest_mode(s);
          s.vmxon_gpa = kInvalidGpa;
          s.vmcs12.reset();
        }),
        fmt::format("eVMCS address {:#x} given but VMX is off", g_.current_vmcs_gpa));
  } else {
    add("evmcs-without-vmxon", with([](S& s) {
          vmx_off(s);
          s.evmcs = true;
          s.current_vmcs_gpa = kInvalidGpa;
          s.vmcs12.reset();
        }),
        "eVMCS flag is set, VMX is off and the vCPU has not enabled the enlightened VMCS");
  }
  // With VMX off an image is ignored (VMMs pass a buffer of the full size);
  // a current-VMCS address is not.
  add("vmcs12-without-vmxon", with(vmx_off), "given but VMX is off");
  add("misaligned-vmxon", with([](S& s) { s.vmxon_gpa += 0x10; }),
      fmt::format("VMXON address {:#x} is not 4 KiB aligned", g_.vmxon_gpa + 0x10));
  add("vmxon-beyond-width", with([](S& s) { s.vmxon_gpa = uint64_t{1} << 47; }), "physical-address width");
  add("misaligned-" + cur_, with([](S& s) { s.current_vmcs_gpa += 0x8; }),
      fmt::format("{} {:#x} is not 4 KiB aligned", current_, g_.current_vmcs_gpa + 0x8));
  add(cur_ + "-beyond-width", with([](S& s) { s.current_vmcs_gpa = uint64_t{1} << 46; }),
      current_ + " 0x400000000000 exceeds the 46-bit physical-address width");
  add(cur_ + "-is-vmxon", with([&](S& s) { s.current_vmcs_gpa = g_.vmxon_gpa; }),
      fmt::format("{} {:#x} is the VMXON region", current_, g_.vmxon_gpa));
  // Without the eVMCS flag, whose own rule is evmcs-without-address.
  add("guest-mode-without-vmcs12", with([](S& s) {
        s.current_vmcs_gpa = kInvalidGpa;
        s.vmcs12.reset();
        s.evmcs = false;
      }),
      "guest-mode flag is set but there is no current vmcs12");
  add("vmcs12-address-without-image", with([](S& s) {
        leave_guest_mode(s);
        s.vmcs12.reset();
      }),
      "given without a vmcs12 image");
  add("image-without-address", with([](S& s) {
        leave_guest_mode(s);
        s.evmcs = false;
        s.current_vmcs_gpa = kInvalidGpa;
      }),
      "vmcs12 image given without a current VMCS address");
  add("evmcs-without-address", with([](S& s) {
        leave_guest_mode(s);
        s.evmcs = true;
        s.current_vmcs_gpa = kInvalidGpa;
        s.vmcs12.reset();
      }),
      "eVMCS flag is set but no eVMCS address");
}

void Catalogue::vmcs12_image() {
  using V = Vmcs12;
  add("shadow-vmcs-indicator", vmcs12_with([](V& x) { x.revision_id |= kVmcsShadowIndicator; }),
      "shadow-VMCS indicator");
  add("wrong-revision", vmcs12_with([](V& x) { x.revision_id = 0x1234; }), "revision 0x1234");
  add("bad-launch-state", vmcs12_with([](V& x) { x.launch_state = 7; }), "launch state 7");
  // A control the good vmcs12 uses, made to fail its address check.
  if (g_.vmcs12->pin_based_controls & pin::kPostedInterrupts)
    add("entry-check-controls", vmcs12_with([](V& x) { x.posted_intr_desc_addr += 4; }),
        "fails posted-interrupt-descriptor");
  else
    add("entry-check-controls", vmcs12_with([](V& x) { x.msr_bitmap += 4; }), "fails msr-bitmap-address");
  add("entry-check-host-state", vmcs12_with([](V& x) { x.host_cr4 = 0; }), "fails host-cr4-fixed");
  add("entry-check-guest-state", vmcs12_with([](V& x) { x.vmcs_link_pointer = 0; }), "fails vmcs-link-pointer");
  if (g_.evmcs) {
    // PAUSE-loop exiting: a control the model supports, so the vmcs12 passes
    // the entry checks, but one eVMCS v1 cannot express.
    add("evmcs-unsupported-controls",
        vmcs12_with([](V& x) { x.secondary_proc_controls |= proc2::kPauseLoopExiting; }),
        "fails evmcs-unsupported-control: secondary controls");
  } else {
    // APIC-access virtualization, which eVMCS v1 cannot express.
    add("evmcs-unsupported-controls", with([&](S& s) {
          s.evmcs = true;
          s.vmcs12->primary_proc_controls |= proc::kActivateSecondaryControls;
          s.vmcs12->secondary_proc_controls |= proc2::kVirtualizeApicAccesses;
          if (!s.vmcs12->apic_access_addr) s.vmcs12->apic_access_addr = unbacked_;
        }),
        "fails evmcs-unsupported-control");
  }
}

void Catalogue::vm_and_vcpu() {
  add("vmxon-without-memslot", with([&](S& s) { s.vmxon_gpa = unbacked_; }),
      fmt::format("VMXON region {:#x} is not backed by a memslot", unbacked_), EINVAL, RefusedBy::restore);
  add(cur_ + "-without-memslot", with([&](S& s) { s.current_vmcs_gpa = unbacked_ + kPageSize; }),
      fmt::format("{} {:#x} is not backed by a memslot", g_.evmcs ? "eVMCS page" : "current vmcs12 region",
                  unbacked_ + kPageSize),
      EINVAL, RefusedBy::restore);
  // The flag on a vCPU that never enabled the enlightened VMCS. With an
  // eVMCS good blob that is the good blob itself, on such a vCPU; otherwise
  // every vCPU is plain and the flag alone is refused.
  Blob flagged = g_.evmcs ? good_ : with([](S& s) {
    s.evmcs = true;
    leave_guest_mode(s);
  });
  std::string expect = "eVMCS flag is set but vCPU 0 has not enabled the enlightened VMCS";
  if (g_.evmcs)
    expect += fmt::format(" (KVM_CAP_HYPERV_ENLIGHTENED_VMCS); eVMCS {:#x} not restored", g_.current_vmcs_gpa);
  add("evmcs-on-vcpu-without-evmcs", flagged, expect, EINVAL, RefusedBy::restore);
  out_.back().needs_plain_vcpu = g_.evmcs;
}

}  // namespace

std::vector<MalformedBlob> malformed_nested_states(std::span<const std::byte> good, Gpa unbacked) {
  Blob blob(good.begin(), good.end());
  auto decoded = decode(blob);
  if (!decoded || !decoded->guest_mode || !decoded->vmcs12) return {};
  return Catalogue(std::move(blob), *decoded, unbacked).all();
}

}  // namespace nestcache::vmx
