// The catalogue of malformed nested-state blobs: one variant of a good blob
// per rule a restore checks (docs/nested-state.md, "Validation"), each with
// the error it must be refused with. Kept once, for every user: the format
// tests run the variants decode() refuses, and the `nested-state` selftest
// sets all of them on a restored vCPU.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "base/types.h"

namespace nestcache::vmx {

// Who refuses a malformed blob.
enum class RefusedBy : uint8_t {
  format,  // decode(): the blob alone breaks a rule of the format or of a state
  restore,  // only set_nested_state on a vCPU: the size limit, memslots, the vCPU's eVMCS capability
};

struct MalformedBlob {
  std::string name;  // kebab-case, for reports ("misaligned-vmxon")
  std::vector<std::byte> blob;
  int code = EINVAL;     // the errno a restore returns
  std::string expect;    // a part of the message that names the broken rule
  RefusedBy refused_by = RefusedBy::format;
  // Refused by a vCPU that has not enabled the enlightened VMCS (set it on
  // such a vCPU); a vCPU with it enabled would accept the blob.
  bool needs_plain_vcpu = false;
};

// More than 20 malformed variants of `good`, a guest-mode blob (with or
// without the eVMCS flag), each breaking a different rule: framing
// (truncated, trailing bytes, oversized, magic, version, sizes, reserved
// bytes, flags), state (flags that do not go together, state given with VMX
// off, misaligned or too wide addresses, the current VMCS being the VMXON
// region), the vmcs12 image (shadow indicator, revision, launch state, each
// kind of entry check, controls eVMCS v1 cannot express), the VM (addresses
// in no memslot: `unbacked` must be an aligned address within the
// physical-address width that no memslot of the restoring VM backs, with
// the page after it unbacked too) and the vCPU (the eVMCS flag on a vCPU
// without the enlightened VMCS). A `good` with the eVMCS flag gets the
// eVMCS forms of the address rules. Every message differs. Empty if `good`
// does not decode or is not in guest mode.
std::vector<MalformedBlob> malformed_nested_states(std::span<const std::byte> good, Gpa unbacked);

}  // namespace nestcache::vmx
