// The nested-state blob: the KVM_GET/SET_NESTED_STATE analogue's binary
// format, version 1 (docs/nested-state.md is the field-by-field reference).
//
// A VMM saves a vCPU's nested VMX state as one blob and restores it on
// another vCPU or VM. This file owns the format only: encode() writes a blob
// from a NestedStateImage, decode() parses and validates one. Validation is in
// two parts:
//   - validate_nested_state(): everything that can be judged from the blob
//     alone (sizes, magic, version, flags that do not go together, address
//     alignment and width, the vmcs12 image, and, in guest mode, the nested
//     VM-entry checks the vmcs12 would have to pass). decode() runs it.
//   - check_nested_state_addresses(): what needs the VM (each address the
//     state names must be backed by a memslot). The vCPU's set-nested-state
//     path calls it with a memslot lookup after decode() and before changing
//     any state.
// The pages a guest-mode vmcs12 names (MSR bitmap, APIC pages, descriptor)
// are not checked here: as in KVM, they are resolved by a request before the
// next entry, and one that cannot be resolved fails that entry cleanly.
//
// Layout (little-endian, offsets in bytes):
//   0   u32  magic "NCNS"
//   4   u16  version (1)
//   6   u16  header size (64)
//   8   u32  total size: header + vmcs12 image
//   12  u32  flags: kGuestMode | kRunPending | kEvmcs
//   16  u64  VMXON address, or all ones when VMX is off
//   24  u64  current VMCS address: the vmcs12, or with kEvmcs the eVMCS;
//            all ones when there is none
//   32  u32  vmcs12 image size: 0 or 4096
//   36  28 bytes reserved, zero
//   64  the vmcs12 region image (Vmcs12::serialize), when its size is 4096.
//       With kEvmcs it is the full eVMCS copy (copy_evmcs_to_vmcs12 with
//       clean fields 0, revision kVmcs12Revision), so a restored L2 never
//       trusts clean bits saved with the blob.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "base/error.h"
#include "base/types.h"
#include "vmx/entry_checks.h"
#include "vmx/vmcs12.h"

namespace nestcache::vmx {

inline constexpr uint32_t kNestedStateMagic = 0x534e434e;  // "NCNS" in memory order
inline constexpr uint16_t kNestedStateVersion = 1;
inline constexpr size_t kNestedStateHeaderSize = 64;
// The largest version-1 blob: the header and one vmcs12 image. A restore
// refuses anything longer with E2BIG before parsing it.
inline constexpr size_t kNestedStateMaxSize = kNestedStateHeaderSize + kVmcsRegionSize;

namespace nested_state_flag {
// The vCPU is in VMX non-root operation running L2 (needs a current vmcs12).
inline constexpr uint32_t kGuestMode = 1u << 0;
// L1's VMLAUNCH/VMRESUME was emulated but the entry into L2 has not happened
// yet (KVM's nested_run_pending); only with kGuestMode.
inline constexpr uint32_t kRunPending = 1u << 1;
// The current VMCS is an enlightened VMCS: the current-VMCS address is the
// eVMCS page, the image is its full copy.
inline constexpr uint32_t kEvmcs = 1u << 2;
inline constexpr uint32_t kAll = kGuestMode | kRunPending | kEvmcs;
}  // namespace nested_state_flag

// Header field offsets, for tools and tests that inspect blobs.
namespace nested_state_offset {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kVersion = 4;
inline constexpr size_t kHeaderSize = 6;
inline constexpr size_t kTotalSize = 8;
inline constexpr size_t kFlags = 12;
inline constexpr size_t kVmxonGpa = 16;
inline constexpr size_t kCurrentVmcsGpa = 24;
inline constexpr size_t kVmcs12Size = 32;
inline constexpr size_t kReserved = 36;
inline constexpr size_t kVmcs12 = kNestedStateHeaderSize;
}  // namespace nested_state_offset

// A decoded blob.
struct NestedStateImage {
  bool guest_mode = false;
  bool run_pending = false;
  bool evmcs = false;
  Gpa vmxon_gpa = kInvalidGpa;         // kInvalidGpa: VMX is off
  Gpa current_vmcs_gpa = kInvalidGpa;  // kInvalidGpa: no current VMCS
  // The cached vmcs12; present exactly when there is a current VMCS.
  std::optional<Vmcs12> vmcs12;

  bool vmx_on() const { return vmxon_gpa != kInvalidGpa; }
  uint32_t flags() const;
  bool operator==(const NestedStateImage&) const = default;
};

// Writes `s` as a version-1 blob. Does not validate: encoding a state that
// validate_nested_state() rejects gives a blob that decode() rejects.
std::vector<std::byte> encode(const NestedStateImage& s);

// Parses and validates a blob (format checks, then validate_nested_state
// with `env`). Fails with EINVAL and a message naming the one rule the blob
// breaks.
Result<NestedStateImage> decode(std::span<const std::byte> blob, const EntryCheckEnv& env = {});

// The semantic checks of a state, whether decoded or built in memory
// (EINVAL, one message per rule; docs/nested-state.md lists them):
//   VMX off -> no guest mode and no current VMCS; an image is ignored, and
//   the eVMCS flag is allowed (and ignored) when env.evmcs_enabled, as KVM
//   keeps accepting both;
//   VMXON and current-VMCS addresses 4 KiB aligned, within the
//   physical-address width, and not the same page;
//   run pending needs guest mode; guest mode needs a current VMCS; the eVMCS
//   flag needs a current (eVMCS) address; an image exactly when there is a
//   current VMCS;
//   the image: revision kVmcs12Revision, no shadow-VMCS indicator, launch
//   state 0 or 1;
//   guest mode: the vmcs12 passes check_vm_entry with `env` (the eVMCS
//   filter when env.evmcs_enabled or the eVMCS flag is set; the guest EFER
//   rules when run pending; the link pointer's VMCS read through
//   env.read_guest32).
Status validate_nested_state(const NestedStateImage& s, const EntryCheckEnv& env = {});

// `backed(gpa, len)` is true when [gpa, gpa + len) lies in the VM's memslots.
using GpaBackedFn = std::function<bool(Gpa gpa, uint64_t len)>;

// The VM-dependent checks: the VMXON region and the current vmcs12 or eVMCS
// page must be backed by memslots (EINVAL otherwise, naming the address).
// Run after decode()/validate_nested_state() and before changing state.
Status check_nested_state_addresses(const NestedStateImage& s, const GpaBackedFn& backed);

}  // namespace nestcache::vmx
